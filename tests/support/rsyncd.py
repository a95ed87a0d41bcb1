"""Test helper: start and stop a real Debian ``rsync --daemon`` on 127.0.0.1 in a temporary directory.

The daemon gets its own config, pid file, log file, secrets file and a free port. Modules:

- ``push``  read-write, no auth (the main replication target)
- ``ro``    read-only
- ``auth``  read-write, ``auth users = kw`` with the password in :attr:`RsyncDaemon.password`

Other tests may reuse it::

    with RsyncDaemon(tmp_path) as d:
        d.port, d.module_path("push")
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ports import free_port

RSYNC = shutil.which("rsync") or "/usr/bin/rsync"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class RsyncDaemon:
    """A real rsync daemon confined to ``base``; use as a context manager."""

    user = "kw"
    password = "s3cret-pw"

    def __init__(self, base: Path, extra_conf: str = "", host: str = "127.0.0.1", prefix: list[str] | None = None,
                 probe: Callable[[str, int], socket.socket] | None = None) -> None:
        """``host``, ``prefix``, ``probe``: as :class:`sshd.Sshd`'s (to run it in a :mod:`netlab` host)."""
        self.base = Path(base)
        self.host = host
        self.prefix = prefix or []
        self.probe = probe or (lambda h, p: socket.create_connection((h, p), timeout=0.5))
        self.port = 0
        self.extra_conf = extra_conf
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def log_path(self) -> Path:
        return self.base / "rsyncd.log"

    def module_path(self, name: str) -> Path:
        return self.base / "modules" / name

    def _write_config(self) -> Path:
        for m in ("push", "ro", "auth"):
            self.module_path(m).mkdir(parents=True, exist_ok=True)
        secrets = self.base / "rsyncd.secrets"
        secrets.write_text(f"{self.user}:{self.password}\n")
        os.chmod(secrets, 0o600)
        conf = self.base / "rsyncd.conf"
        conf.write_text(
            f"pid file = {self.base / 'rsyncd.pid'}\n"
            f"log file = {self.log_path}\n"
            "use chroot = no\n"
            "uid = root\n"
            "gid = root\n"
            "munge symlinks = no\n"
            f"{self.extra_conf}\n"
            f"[push]\n  path = {self.module_path('push')}\n  read only = no\n\n"
            f"[ro]\n  path = {self.module_path('ro')}\n  read only = yes\n\n"
            f"[auth]\n  path = {self.module_path('auth')}\n  read only = no\n"
            f"  auth users = {self.user}\n  secrets file = {secrets}\n"
        )
        return conf

    def start(self) -> RsyncDaemon:
        self.base.mkdir(parents=True, exist_ok=True)
        conf = self._write_config()
        last_err = ""
        keep_port = self.port != 0  # started again after stop(): the same port, as a restarted server
        for _attempt in range(5):  # the free port can be taken between probe and bind: retry
            if not keep_port:
                self.port = free_port()
            self.proc = subprocess.Popen(
                [*self.prefix, RSYNC, "--daemon", "--no-detach", f"--config={conf}", f"--address={self.host}",
                 f"--port={self.port}"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(OSError), self.probe(self.host, self.port):
                    return self
                time.sleep(0.05)
            last_err = self._stop_proc()
            if keep_port:
                time.sleep(0.5)  # the old listener's port may still be in use for a moment
        raise RuntimeError(f"rsync daemon did not start on 127.0.0.1: {last_err}")

    def _stop_proc(self) -> str:
        err = ""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=STOP_TIMEOUT)
            if self.proc.stderr is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                self.proc.stderr.close()
            self.proc = None
        return err

    def stop(self) -> None:
        self._stop_proc()

    def url(self, module: str, path: str = "", user: str | None = None) -> str:
        who = f"{user}@" if user else ""
        return f"rsync://{who}{self.host}:{self.port}/{module}/{path}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> RsyncDaemon:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
