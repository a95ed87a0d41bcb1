"""The test network itself (tests/support/netlab.py): it carries TCP, its delay shows in a handshake's RTT, its rate in a
transfer's time, a partition makes connects time out, and closing it leaves no namespace or process behind (also
after a failure inside the ``with``)."""

from __future__ import annotations

import shlex
import socket
import subprocess
import sys
import time

import pytest
from netlab import NetLab
from pyroute2 import netns
from sshd import Sshd

pytestmark = [pytest.mark.root]

SINK = """
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind((sys.argv[1], 5001)); s.listen(20)
print("listening", flush=True)
def serve(c):
    n = 0
    while (d := c.recv(1 << 16)):
        n += len(d)
    c.sendall(str(n).encode()); c.close()
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""


def _sink(lab: NetLab) -> subprocess.Popen[bytes]:
    p = subprocess.Popen([*lab.argv("mirror"), sys.executable, "-c", SINK, lab.mirror_ip], stdout=subprocess.PIPE)
    assert p.stdout is not None and p.stdout.readline() == b"listening\n"
    return p


def _send(lab: NetLab, nbytes: int) -> float:
    t0 = time.monotonic()
    with lab.connect("src", lab.mirror_ip, 5001, timeout=60) as s:
        s.sendall(b"x" * nbytes)
        s.shutdown(socket.SHUT_WR)
        assert int(s.recv(64)) == nbytes
    return time.monotonic() - t0


def test_delay_rate_loss_and_partition() -> None:
    with NetLab() as lab:
        names = set(lab.ns.values())
        assert names <= set(netns.listnetns())
        sink = _sink(lab)
        try:
            base = lab.rtt(5001)
            lab.set_shape(delay_ms=50)  # 100 ms RTT
            rtt = lab.rtt(5001)
            assert 0.095 < rtt < 0.5, f"RTT {rtt:.3f}s with 50 ms each way (unshaped {base:.4f}s)"
            lab.set_shape(delay_ms=10, jitter_ms=5, loss=0.02, reorder=0.05, seed=1)
            took = _send(lab, 2 << 20)  # TCP recovers every lost and reordered segment: the count checks it
            stats = lab.wire_stats()
            assert stats["dropped"] > 0, stats
            lab.set_shape()
            lab.set_rate(1000)  # 1 Mbit/s: 250 kB take about 2 s
            slow = _send(lab, 250_000)
            assert slow > 1.5, f"250 kB in {slow:.2f}s through a 1 Mbit/s link"
            lab.set_rate(None)
            fast = _send(lab, 250_000)
            assert fast < slow / 3, (fast, slow)
            lab.partition()
            with pytest.raises(TimeoutError):
                lab.connect("src", lab.mirror_ip, 5001, timeout=2.0)
            lab.heal()
            assert lab.rtt(5001) < 0.05
            print(f"netlab: unshaped RTT {base * 1000:.2f} ms, 100 ms configured: {rtt * 1000:.1f} ms; 2 MiB over 10+-5 "
                  f"ms with 2% loss and 5% reordering in {took:.2f}s; 250 kB at 1 Mbit/s {slow:.2f}s, unlimited "
                  f"{fast:.3f}s")
        finally:
            sink.kill()
            sink.wait()
    assert not names & set(netns.listnetns()), "namespaces left behind"
    assert lab.wire is None


def test_cleanup_after_a_failure_and_sshd_in_the_mirror_host(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    wire_pid = 0
    with pytest.raises(RuntimeError, match="boom"), NetLab() as lab:
        names = set(lab.ns.values())
        assert lab.wire is not None
        wire_pid = lab.wire.pid
        d = Sshd(tmp_path / "sshd", host=lab.mirror_ip, prefix=lab.argv("mirror"),
                 probe=lambda h, p: lab.connect("mirror", h, p, timeout=0.5))
        with d:
            # the daemon listens in the mirror host only: reachable from the source host, not from this namespace
            r = subprocess.run([*lab.argv("src"), *shlex.split(d.ssh_command), "-o", "BatchMode=yes",
                                f"root@{lab.mirror_ip}", "echo $SSH_CONNECTION"], capture_output=True, timeout=60)
            assert r.returncode == 0, r.stderr
            assert r.stdout.split()[0].decode() == lab.src_ip
            with pytest.raises(OSError):
                socket.create_connection((lab.mirror_ip, d.port), timeout=1.0)
        raise RuntimeError("boom")
    assert not names & set(netns.listnetns()), "namespaces left behind after a failure"
    with pytest.raises(ProcessLookupError):
        import os

        os.kill(wire_pid, 0)
