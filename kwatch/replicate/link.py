"""The I/O edge of the agent protocol on the sender: a child process (``ssh host kwatch agent`` or a local agent on a
pipe) driven through a sender-role :class:`AgentConnection`.

Writes never block the reading of replies: :meth:`AgentLink.pump` writes pending frames while reading whatever the
agent sends, with select(), so a sender streaming a large batch and an agent answering with signatures or acks can
never deadlock on full pipes. Everything has a deadline; a dead or silent agent is a :class:`LinkError`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable, Sequence

from kwatch.fsutil import grow_pipe
from kwatch.protocols import agent as ap
from kwatch.protocols.errors import ProtocolError
from kwatch.replicate.failure import classify

WRITE_HIGH_WATER = 4 << 20  # pump once this much is queued: bounded memory, steady streaming
class LinkError(RuntimeError):
    """The agent is gone, silent, or broke the protocol; the message says which and what it last said.

    ``down`` says why the target is down in a word the metrics export (see :mod:`kwatch.replicate.failure`), and
    ``permanent`` whether trying again without a change by the operator can help (``--once`` then gives up)."""

    def __init__(self, message: str, down: str = "error", permanent: bool = False) -> None:
        super().__init__(message)
        self.down = down
        self.permanent = permanent


class AgentLink:
    def __init__(
        self, argv: Sequence[str], *, timeout: float = 60.0, capabilities: frozenset[str] = ap.CAPABILITIES
    ) -> None:
        self.argv = list(argv)
        self.timeout = timeout
        self.conn = ap.AgentConnection(ap.Role.SENDER, capabilities)
        self.events: collections.deque[ap.Message] = collections.deque()
        self.bytes_out = 0
        self.bytes_in = 0
        self._out = bytearray()
        #: called when the link is about to wait for the agent (its input full, or a reply not there yet): the
        #: replicator folds new events meanwhile instead of all at once after the batch
        self.on_wait: Callable[[], None] | None = None
        self._stderr: collections.deque[str] = collections.deque(maxlen=20)
        try:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as e:
            raise LinkError(f"cannot start agent {' '.join(self.argv)}: {e.strerror}", "missing_command",
                            permanent=True) from e
        assert self.proc.stdin and self.proc.stdout and self.proc.stderr
        self._win = self.proc.stdin.fileno()
        self._rout = self.proc.stdout.fileno()
        os.set_blocking(self._win, False)
        os.set_blocking(self._rout, False)
        for fd in (self._win, self._rout):
            grow_pipe(fd)
        self._errthread = threading.Thread(target=self._read_stderr, daemon=True)
        self._errthread.start()
        self._sel = selectors.DefaultSelector()
        try:
            self.send(self.conn.hello())
            self.wait_for(lambda: self.conn.ready, "the agent's hello")
        except LinkError as e:
            # nobody holds this half-made link: release its process, pipes and selector here (a target that kept
            # failing leaked an epoll descriptor and three pipes per attempt)
            why = self.explain(e)
            self.kill()
            raise why from e

    def explain(self, e: LinkError) -> LinkError:
        """``e`` with why the target is down, from the exit status and the last words of the process (ssh's)."""
        status = self.proc.poll()
        if status is None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                status = self.proc.wait(1.0)
        self._errthread.join(1.0)
        down, permanent, hint = classify(status, list(self._stderr))
        if down == "error":
            return e
        return LinkError(f"{e}{hint}", down, permanent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def capabilities(self) -> frozenset[str]:
        return self.conn.capabilities if hasattr(self.conn, "capabilities") else frozenset()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode("utf-8", "replace").rstrip())

    def last_words(self) -> str:
        return " | ".join(self._stderr) or "(nothing on stderr)"

    # ---- sending and receiving -------------------------------------------------------------------------------------

    def send(self, msg: ap.Message) -> None:
        try:
            data = self.conn.send(msg)
        except ProtocolError as e:
            raise LinkError(f"protocol: {e}") from e
        self._out += data
        self.bytes_out += len(data)
        if len(self._out) >= WRITE_HIGH_WATER:
            self.pump(until=lambda: len(self._out) < WRITE_HIGH_WATER // 2, what="the agent to read")

    def write_now(self) -> None:
        """Write what the agent's input takes right now, without waiting (frames that give the agent work)."""
        if self._out:
            self._write()

    def flush(self) -> None:
        self.pump(until=lambda: not self._out, what="the agent to read")

    def wait_for(self, cond: object, what: str) -> None:
        self.pump(until=cond, what=what)

    def pump(self, until: object, what: str) -> None:
        """Write pending bytes and read replies until ``until()`` holds; LinkError after ``timeout`` idle seconds."""
        cond = until  # a callable returning bool
        deadline = time.monotonic() + self.timeout
        while not cond():  # type: ignore[operator]
            self._sel.register(self._rout, selectors.EVENT_READ)
            if self._out:
                self._sel.register(self._win, selectors.EVENT_WRITE)
            try:
                ready = self._sel.select(0) if self.on_wait is not None else []
                if not ready:
                    if self.on_wait is not None:
                        self.on_wait()
                    ready = self._sel.select(max(0.0, deadline - time.monotonic()))
            finally:
                for fd in (self._rout, self._win):
                    with contextlib.suppress(KeyError):
                        self._sel.unregister(fd)
            if not ready:
                if time.monotonic() >= deadline:
                    raise LinkError(f"timed out after {self.timeout:.0f}s waiting for {what}; "
                                    f"agent said: {self.last_words()}", "timeout")
                continue
            deadline = time.monotonic() + self.timeout
            for key, _ in ready:
                if key.fd == self._win:
                    self._write()
                else:
                    self._read()

    def _write(self) -> None:
        try:
            n = os.write(self._win, self._out)
        except BlockingIOError:
            return
        except BrokenPipeError as e:
            raise LinkError(f"the agent closed its input; it said: {self.last_words()}") from e
        del self._out[:n]

    def _read(self) -> None:
        try:
            data = os.read(self._rout, 1 << 20)
        except BlockingIOError:
            return
        self.bytes_in += len(data)
        try:
            self.conn.receive_data(data)
            while True:
                ev = self.conn.next_event()
                if isinstance(ev, ap.NeedData):
                    break
                if isinstance(ev, ap.ConnectionClosed):
                    raise LinkError(f"the agent closed the connection; it said: {self.last_words()}")
                if isinstance(ev, ap.Error):
                    raise LinkError(f"the agent refused: {ev.code}: {ev.message}")
                self.events.append(ev)
        except ProtocolError as e:
            raise LinkError(f"the agent broke the protocol: {e}; it said: {self.last_words()}", "protocol") from e
        if not data:
            raise LinkError(f"the agent exited; it said: {self.last_words()}")

    def take(self, kind: type[ap.Message], what: str) -> ap.Message:
        """The next received message of ``kind`` (messages are answered in request order by the agent)."""
        self.pump(until=lambda: any(isinstance(e, kind) for e in self.events), what=what)
        for i, e in enumerate(self.events):
            if isinstance(e, kind):
                del self.events[i]
                return e
        raise AssertionError("unreachable")

    def close(self, timeout: float = 10.0) -> None:
        """Clean end: flush, close our side, wait for the agent to exit (kill it if it does not)."""
        try:
            if self.proc.poll() is None and self._out:
                self.flush()
        except LinkError:
            pass
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._sel.close()
        self._errthread.join(1.0)
        if self.proc.stderr is not None and not self._errthread.is_alive():
            self.proc.stderr.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.close(timeout=5)
