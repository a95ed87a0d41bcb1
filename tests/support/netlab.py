"""Test network made with pyroute2: two test hosts in network namespaces of their own, joined through a wire.

::

    [src ns] s0 ==veth== wa [wire ns] wb ==veth== m0 [mirror ns]
    198.18.N.1/24                                  198.18.N.2/24

- The source host (``src``) runs ``kwatch replicate``; the mirror host (``mirror``) runs sshd, the rsync daemon
  and, through sshd, the agent. Addresses are in 198.18.0.0/15 (RFC 2544's range for benchmark networks), a /24 per
  lab so labs of tests running side by side do not collide; nothing here routes anywhere else.
- The wire namespace forwards frames between ``wa`` and ``wb`` with :mod:`netwire` (delay, jitter, loss,
  reordering: the kernel here has no netem), and holds the kernel's tbf qdisc (rate, set through pyroute2) on both
  of its egress sides.
- :meth:`NetLab.partition` sets ``wb`` down: both hosts keep their links and addresses, and every frame between
  them is lost silently, as on a real partition (connects time out rather than fail at once).

:class:`NetLab` is a context manager that removes every namespace, link and process it made, also when the test
fails. Nothing runs through ``ip`` or ``tc``: namespaces, links, addresses, qdiscs are netlink calls (pyroute2);
processes enter a host with ``nsenter --net`` (:meth:`NetLab.argv`), and :meth:`NetLab.connect` opens a socket in a
host's namespace from this process (setns on this thread for the ``socket()`` call only).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from pyroute2 import NetNS, netns

HERE = Path(__file__).resolve().parent
NSENTER = "/usr/bin/nsenter"


def _used_subnets() -> set[int]:
    """Third octets of the 198.18.N.0/24 labs whose namespaces exist now (another test's, maybe another helper's)."""
    used = set()
    for name in netns.listnetns():
        if name.startswith("kwl") and "-" in name:
            with contextlib.suppress(ValueError):
                used.add(int(name.split("-")[1]))
    return used


class NetLab:
    """Two hosts and a wire; see the module docstring. ``lab.src_ip`` / ``lab.mirror_ip`` are the addresses."""

    def __init__(self) -> None:
        free = [n for n in range(1, 255) if n not in _used_subnets()]
        self.net = free[secrets.randbelow(len(free))]
        tag = f"{self.net}-{secrets.token_hex(3)}"
        self.ns = {h: f"kwl{h[0]}-{tag}" for h in ("src", "wire", "mirror")}
        self.src_ip = f"198.18.{self.net}.1"
        self.mirror_ip = f"198.18.{self.net}.2"
        self.ifaces = {"src": "s0", "wa": "wa", "wb": "wb", "mirror": "m0"}
        self.wire: subprocess.Popen[bytes] | None = None
        self.made: list[str] = []
        self.shape: dict[str, float] = {}
        self.rate_kbit: int | None = None

    # ---------------------------------------------------------------------------------------------- setup/teardown

    def start(self) -> NetLab:
        try:
            for ns in self.ns.values():
                netns.create(ns)
                self.made.append(ns)
            # a veth pair is made with both ends in their namespaces at once, so no name touches the root namespace
            with NetNS(self.ns["wire"]) as w:
                w.link("add", ifname="wa", kind="veth", peer={"ifname": "s0", "net_ns_fd": self.ns["src"]})
                w.link("add", ifname="wb", kind="veth", peer={"ifname": "m0", "net_ns_fd": self.ns["mirror"]})
                for name in ("wa", "wb"):
                    idx = w.link_lookup(ifname=name)[0]
                    w.link("set", index=idx, state="up")
            for host, ip, ifname in (("src", self.src_ip, "s0"), ("mirror", self.mirror_ip, "m0")):
                with NetNS(self.ns[host]) as h:
                    lo = h.link_lookup(ifname="lo")[0]
                    h.link("set", index=lo, state="up")
                    idx = h.link_lookup(ifname=ifname)[0]
                    h.addr("add", index=idx, address=ip, prefixlen=24)
                    # one MSS per skb: a lost frame is a lost segment, as on a real link, not a 64 KiB GSO train
                    h.link("set", index=idx, state="up", gso_max_segs=1)
            self.wire = subprocess.Popen(
                [*self.argv("wire"), sys.executable, "-u", str(HERE / "netwire.py"), "wa", "wb"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert self.wire.stdout is not None
            line = self.wire.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"netwire did not start: {line!r}")
            self._wait_reachable()
            return self
        except BaseException:
            self.close()
            raise

    def _wait_reachable(self, timeout: float = 20.0) -> None:
        """IPv4 duplicate address detection does not apply; wait until the links carry a TCP handshake (an RST)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.connect("src", self.mirror_ip, 9, timeout=1.0).close()
                return
            except ConnectionRefusedError:
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        wire, self.wire = self.wire, None
        if wire is not None:
            with contextlib.suppress(OSError):
                assert wire.stdin is not None
                wire.stdin.close()  # EOF ends it
            try:
                wire.wait(5)
            except subprocess.TimeoutExpired:
                wire.kill()
                wire.wait(5)
            if wire.stdout is not None:
                wire.stdout.close()
        # removing a namespace removes its links (and their veth peers in the other namespaces) and qdiscs
        for ns in reversed(self.made):
            with contextlib.suppress(OSError, FileNotFoundError):
                netns.remove(ns)
        self.made.clear()

    def __enter__(self) -> NetLab:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---------------------------------------------------------------------------------------------------- use

    def argv(self, host: str) -> list[str]:
        """The prefix that runs a command in ``host``'s namespace (nsenter execs it: the pid is the command's)."""
        return [NSENTER, f"--net=/run/netns/{self.ns[host]}", "--"]

    def connect(self, host: str, addr: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP connection from ``host``'s namespace (the socket is made there; the connect runs here)."""
        s = self.socket(host)
        s.settimeout(timeout)
        try:
            s.connect((addr, port))
        except BaseException:
            s.close()
            raise
        return s

    def socket(self, host: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket in ``host``'s namespace: setns on this thread for the call, then back."""
        here = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            there = os.open(f"/run/netns/{self.ns[host]}", os.O_RDONLY)
            try:
                _setns(there)
                try:
                    return socket.socket(family, kind)
                finally:
                    _setns(here)
            finally:
                os.close(there)
        finally:
            os.close(here)

    def rtt(self, port: int, samples: int = 5) -> float:
        """Median seconds of a TCP handshake from the source host to ``port`` on the mirror host (ping-free)."""
        took = []
        for _ in range(samples):
            t0 = time.monotonic()
            with contextlib.suppress(ConnectionRefusedError):
                self.connect("src", self.mirror_ip, port, timeout=10.0).close()
            took.append(time.monotonic() - t0)
        return sorted(took)[len(took) // 2]

    def set_shape(self, *, delay_ms: float = 0.0, jitter_ms: float = 0.0, loss: float = 0.0, reorder: float = 0.0,
                  seed: int | None = None) -> None:
        """The wire's shaping, both directions: ``delay_ms`` one way (RTT is twice it), loss/reorder as fractions."""
        shape: dict[str, float] = {"delay_ms": delay_ms, "jitter_ms": jitter_ms, "loss": loss, "reorder": reorder}
        if seed is not None:
            shape["seed"] = seed
        self._wire_cmd(json.dumps(shape))
        self.shape = shape

    def _wire_cmd(self, line: str) -> bytes:
        assert self.wire is not None and self.wire.stdin is not None and self.wire.stdout is not None
        self.wire.stdin.write(line.encode() + b"\n")
        self.wire.stdin.flush()
        return self.wire.stdout.readline().strip()

    def wire_stats(self) -> dict[str, int]:
        stats: dict[str, int] = json.loads(self._wire_cmd("stats"))
        return stats

    def set_rate(self, kbit: int | None) -> None:
        """A tbf qdisc on both of the wire's egress sides (``None``: removed), through pyroute2."""
        with NetNS(self.ns["wire"]) as w:
            for name in ("wa", "wb"):
                idx = w.link_lookup(ifname=name)[0]
                if self.rate_kbit is not None:
                    w.tc("del", index=idx, root=True)
                if kbit is not None:
                    # a burst of a few frames and a queue of about 200 ms at the rate, as a slow access link
                    w.tc("add", "tbf", index=idx, handle="1:", rate=f"{kbit}kbit", burst=max(4500, kbit * 125 // 50),
                         latency="200ms")
        self.rate_kbit = kbit

    def partition(self) -> None:
        """Every frame between the hosts is lost from now on (``wb`` down; the hosts' own links stay up)."""
        self._link("wb", "down")

    def heal(self) -> None:
        self._link("wb", "up")

    def _link(self, name: str, state: str) -> None:
        with NetNS(self.ns["wire"]) as w:
            w.link("set", index=w.link_lookup(ifname=name)[0], state=state)


def _setns(fd: int) -> None:
    """setns(2) for the network namespace (Python 3.11's os has no setns)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    clone_newnet = 0x40000000
    if libc.setns(fd, clone_newnet) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
