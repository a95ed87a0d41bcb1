"""Test helper: start and stop a real Debian ``sshd`` on 127.0.0.1 in a temporary directory, with generated keys.

The daemon runs in the foreground (``-D``) with its own config, host key, pid file and log file, on a free port;
it accepts only the generated client key, for root (``PermitRootLogin prohibit-password``), without PAM. Only the
process this helper started is ever stopped. Use as a context manager::

    with Sshd(tmp_path / "sshd") as d:
        run(["kwatch", "replicate", src, f"root@127.0.0.1:{mirror}", "-e", d.ssh_command, ...])

:meth:`Sshd.stop` then :meth:`Sshd.start` again reuses the same port (to test a target that is down for a while).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from ports import free_port

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


def _keygen(path: Path) -> None:
    subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "kwatch-test", "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True, timeout=30)


class Sshd:
    """A real sshd confined to ``base`` (config, keys, pid and log files live there)."""

    user = "root"

    def __init__(self, base: Path, host: str = "127.0.0.1", prefix: list[str] | None = None,
                 probe: Callable[[str, int], socket.socket] | None = None) -> None:
        """``host``: the address to listen on; ``prefix``: argv put before sshd's (e.g. :meth:`netlab.NetLab.argv`
        to start it in a test host's namespace); ``probe``: opens a connection to (host, port) to see it listening
        (default: from this process's namespace)."""
        self.base = Path(base)
        self.host = host
        self.prefix = prefix or []
        self.probe = probe or (lambda h, p: socket.create_connection((h, p), timeout=0.5))
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.host_key = self.base / "ssh_host_ed25519_key"
        self.client_key = self.base / "id_ed25519"
        self.pid_file = self.base / "sshd.pid"
        self.log_path = self.base / "sshd.log"
        self.config = self.base / "sshd_config"

    @property
    def ssh_command(self) -> str:
        """The ``-e`` string for ``kwatch replicate`` (as rsync's)."""
        return shlex.join([
            "ssh", "-p", str(self.port), "-i", str(self.client_key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=5",
        ])

    def target(self, path: os.PathLike[str] | str) -> str:
        """A ``user@host:/path`` target spec for this daemon."""
        return f"{self.user}@{self.host}:{os.fspath(path)}"

    def _prepare(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # privilege separation needs its empty chroot directory (Debian creates it from the service unit only)
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        if not self.host_key.exists():
            _keygen(self.host_key)
        if not self.client_key.exists():
            _keygen(self.client_key)
            (self.base / "authorized_keys").write_bytes(self.client_key.with_suffix(".pub").read_bytes())

    def _write_config(self) -> None:
        self.config.write_text(
            f"Port {self.port}\n"
            f"ListenAddress {self.host}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.pid_file}\n"
            f"AuthorizedKeysFile {self.base / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "PrintMotd no\n"
            "X11Forwarding no\n"
            "MaxStartups 50:30:100\n"
            "MaxSessions 50\n"
            "LogLevel ERROR\n"
        )

    def start(self) -> Sshd:
        self._prepare()
        keep_port = self.port != 0
        last_err = ""
        for _attempt in range(5):
            if not keep_port:
                self.port = free_port()
            self._write_config()
            self.proc = subprocess.Popen(
                [*self.prefix, SSHD, "-D", "-e", "-f", str(self.config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=open(self.log_path, "ab"),  # noqa: SIM115
            )
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                with contextlib.suppress(OSError), self.probe(self.host, self.port):
                    return self
                time.sleep(0.05)
            self._stop_proc()
            last_err = self.log()[-2000:]
            if keep_port:
                time.sleep(0.5)  # the old listener's port may still be in use for a moment
        raise RuntimeError(f"sshd did not start on {self.host}:{self.port}: {last_err}")

    def _stop_proc(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()  # our own pid, never a name: sshd sessions of other users are not touched
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)

    def stop(self) -> None:
        """Stop the listener (sessions already open live on in their own processes until their client ends)."""
        self._stop_proc()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def run(self, command: str, timeout: float = 30.0) -> subprocess.CompletedProcess[bytes]:
        """Run ``command`` through the daemon (to check it works)."""
        argv = [*shlex.split(self.ssh_command), "-o", "BatchMode=yes", f"{self.user}@{self.host}", command]
        return subprocess.run(argv, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def __enter__(self) -> Sshd:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
