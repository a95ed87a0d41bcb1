"""Test helper: real Debian ``nats-server`` processes with JetStream on 127.0.0.1: one server, or a cluster.

Each server gets free ports (client, cluster routes, HTTP monitoring), its own config file and store directory under
the test's temp dir. ``start`` waits until the monitoring endpoint's ``/healthz`` says the server (and JetStream) is
ready; ``kill`` is SIGKILL (a crash); ``start`` again reuses the same ports and store, as a restarted server does.
``NatsCluster`` is three such servers routed to each other. Use both as context managers: every process is killed
on exit, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from ports import free_port

from kwatch.outputs import fleet

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
START_TIMEOUT = 60.0


class NatsServer:
    def __init__(self, base: Path, name: str = "n1", cluster: str | None = None) -> None:
        self.base = Path(base) / name
        self.base.mkdir(parents=True, exist_ok=True)
        self.name = name
        self.cluster = cluster
        self.port = free_port()
        self.cluster_port = free_port()
        self.http_port = free_port()
        self.routes: list[int] = []
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _config(self) -> Path:
        conf = self.base / "nats.conf"
        text = (
            f'server_name: "{self.name}"\n'
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.http_port}\n"
            f'jetstream {{ store_dir: "{self.base / "store"}", max_memory_store: 64MB, max_file_store: 1GB }}\n'
        )
        if self.cluster is not None:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for p in self.routes)
            text += f'cluster {{ name: "{self.cluster}", listen: 127.0.0.1:{self.cluster_port}, routes: [{routes}] }}\n'
        conf.write_text(text)
        return conf

    def start(self, wait: bool = True) -> None:
        log = open(self.base / "nats.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen([NATS_SERVER, "-c", str(self._config())], stdout=log, stderr=log)
        log.close()
        if wait:
            self.wait_ready()

    def healthy(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"nats-server {self.name} exited: {self.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if time.monotonic() > deadline:
                raise AssertionError(f"nats-server {self.name} not ready after {timeout} s: {self.log_tail()}")
            time.sleep(0.05)

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.base / "nats.log").read_text(errors="replace")[-2000:]
        return ""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def __enter__(self) -> NatsServer:
        self.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.kill()


class NatsCluster:
    """Three JetStream servers routed to each other (a stream with 3 replicas survives losing one)."""

    def __init__(self, base: Path, size: int = 3) -> None:
        self.servers = [NatsServer(base, f"n{i + 1}", cluster="kwtest") for i in range(size)]
        for s in self.servers:
            s.routes = [o.cluster_port for o in self.servers if o is not s]

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def by_name(self, name: str) -> NatsServer:
        return next(s for s in self.servers if s.name == name)

    def __enter__(self) -> NatsCluster:
        try:
            for s in self.servers:
                s.start(wait=False)
            for s in self.servers:
                s.wait_ready()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        for s in self.servers:
            s.kill()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def _stored(servers: list[str], stream: str) -> list[tuple[dict[str, str], bytes]]:
    """Every message of the stream, in stream order: (headers, body)."""
    import nats

    nc = await nats.connect(servers)
    try:
        jsm = nc.jsm()
        info = await jsm.stream_info(stream)
        out = []
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            m = await jsm.get_msg(stream, seq)
            out.append((m.headers or {}, m.data or b""))
        return out
    finally:
        await nc.close()


def stored_records(servers: list[str], stream: str = "KWATCH") -> dict[str, list[dict[str, Any]]]:
    """The stream's records by host, in stream order; also checks each message's sequence numbers."""
    by_host: dict[str, list[dict[str, Any]]] = {}
    for headers, body in run(_stored(servers, stream)):
        got = fleet.unpack(headers, body)
        assert got is not None
        host, _, _, lines = got
        assert int(headers[fleet.H_COUNT]) == len(lines)
        by_host.setdefault(host, []).extend(json.loads(ln) for ln in lines)
    return by_host
