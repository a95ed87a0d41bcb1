"""Test helper: a ``systemd-journald`` instance of the test's own, and its entries as ``journalctl -o json`` shows them.

journald does not run on this machine (PID 1 is not systemd). ``systemd-journald NS`` runs an instance for the
journal namespace NS: it binds ``/run/systemd/journal.NS/socket`` itself and stores under
``/var/log/journal/<machine-id>.NS``; ``journalctl --namespace=NS`` reads it. The namespace is named after the test
process, and its files are removed on exit, whatever happened.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from types import TracebackType

JOURNALD = "/lib/systemd/systemd-journald"
START_TIMEOUT = 30.0


class Journald:
    def __init__(self, name: str | None = None) -> None:
        self.ns = name or f"kwtest{os.getpid()}"
        self.socket = f"/run/systemd/journal.{self.ns}/socket"
        self.proc: subprocess.Popen[bytes] | None = None

    def entries(self, identifier: str) -> list[dict[str, object]]:
        """Every entry with this SYSLOG_IDENTIFIER, oldest first (``--all``: values over 4096 bytes too)."""
        out = subprocess.run(["journalctl", f"--namespace={self.ns}", "-o", "json", "--all", "--no-pager",
                              f"SYSLOG_IDENTIFIER={identifier}"], capture_output=True, check=False).stdout
        return [json.loads(ln) for ln in out.splitlines()]

    def __enter__(self) -> Journald:
        self.proc = subprocess.Popen([JOURNALD, self.ns], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(self.socket):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                err = self.proc.stderr.read().decode() if self.proc.stderr and self.proc.poll() is not None else ""
                self.__exit__(None, None, None)
                raise AssertionError(f"systemd-journald {self.ns} did not start: {err}")
            time.sleep(0.02)
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self.proc is not None:
            self.proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(30)
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self.proc = None
        with open("/etc/machine-id") as f:
            mid = f.read().strip()
        for d in (f"/var/log/journal/{mid}.{self.ns}", f"/run/log/journal/{mid}.{self.ns}",
                  f"/run/systemd/journal.{self.ns}"):
            shutil.rmtree(d, ignore_errors=True)
