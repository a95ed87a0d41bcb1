"""The fleet bus publisher: records to NATS JetStream, through the on-disk spool, in order, once.

The daemon's capture is threaded, not asyncio, so the NATS client runs in a thread of its own with its own event
loop. ``write`` (the daemon's thread) appends the records to the spool itself, as batches
(:mod:`kwatch.outputs.fleet`) numbered in order, and wakes the loop. Nothing sits in memory between the two threads:
an in-memory queue that the publisher thread drained overflowed at a sustained 120k records/s (the publisher competes
for the GIL with the capture), while one ``write`` of a 256 KiB batch to the page cache keeps up with any capture.
When the spool is full, records are dropped and counted in ``lost`` until the server has taken half of the spool;
then a marker record saying how many were lost is spooled, and records again after it. The publisher thread:

1. while connected, sends the spool's oldest batches, merged into one message of up to 1 MiB, and waits for
   JetStream's acknowledgement before it removes them and sends the next (one message in flight keeps a host's
   records in order through a leader change);
2. after any failure or reconnect, first asks the stream for the host's last stored message, and drops spooled
   batches it already holds (the acknowledgement was lost, or a restarted daemon's spool was already sent);
   JetStream's duplicate window (message id ``host:boot:seq``) catches the rest.

The spool is not thread-safe; ``_lock`` guards it (an append, the head's read-back, a pop: each short).

When the server is unreachable, batches wait in the spool (bounded by ``spool_max_bytes``); a daemon stopped meanwhile
leaves them there for the next start. ``close`` sends what it can for up to ``close_timeout`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kwatch.metrics.stats import OutputStats
from kwatch.outputs import fleet
from kwatch.outputs.config import OutputSpec
from kwatch.outputs.record import Record
from kwatch.outputs.spool import SeqState, Spool

log = logging.getLogger("kwatch.outputs.nats")

PUBLISH_TIMEOUT = 2.0
RETRY_MIN = 0.1
RETRY_MAX = 2.0
SEND_BYTES = 1 << 20  # a message's body at most (NATS's default max_payload is 1 MiB: less its headers' room)
HEADER_ROOM = 4 << 10
SEND_BATCHES_MAX = 4096
DUPLICATE_WINDOW = 120.0  # seconds; JetStream's default, set explicitly when kwatch creates the stream


def read_boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip().replace("-", "")


async def ensure_stream(js: Any, name: str, prefix: str, replicas: int) -> None:
    """Create the stream (subjects ``<prefix>.>``) unless it exists."""
    import nats.js.errors

    try:
        await js.stream_info(name)
        return
    except nats.js.errors.NotFoundError:
        pass
    await js.add_stream(name=name, subjects=[f"{prefix}.>"], num_replicas=replicas,
                        duplicate_window=DUPLICATE_WINDOW)


class NatsOutput:
    def __init__(self, spec: OutputSpec, stats: OutputStats, *, host: str, boot: str,
                 loss_marker: Callable[[int, str], Record], close_timeout: float = 5.0) -> None:
        self.spec = spec
        self.stats = stats
        self.host = host
        self.subject = fleet.subject(spec.subject_prefix, host)
        self.loss_marker = loss_marker
        self.close_timeout = close_timeout
        self.spool = Spool(spec.spool, spec.spool_max_bytes)
        self.seq = SeqState(spec.spool, boot, self.spool.last_boot, self.spool.last_seq)
        self.boot = boot
        self._lock = threading.Lock()
        self._spool_lost = 0
        self._stopping = False
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._nc: Any = None
        self._js: Any = None
        self._resync = True
        self._retry_frames = 0  # spooled batches of the message that failed (0: none failed)
        self._send_max = SEND_BYTES  # halved each time the stream refuses a merged message
        stats.connected = False
        stats.backlog = lambda: self.spool.records
        stats.backlog_bytes = lambda: self.spool.bytes
        if self.spool.repaired_bytes:
            stats.repaired_bytes += self.spool.repaired_bytes
            reason = f"cut {self.spool.repaired_bytes} torn bytes from the spool (a crash)"
            if not self._append([self.loss_marker(0, reason).line]):
                log.warning("output %s: %s", spec.name, reason)
        self._thread = threading.Thread(target=self._run, name=f"nats {spec.name}", daemon=True)
        self._thread.start()
        self._ready.wait()

    # -- the daemon's side -----------------------------------------------------------------------------------------

    def write(self, records: Sequence[Record]) -> None:
        self.write_lines([r.line for r in records])

    def write_lines(self, lines: Sequence[bytes]) -> None:
        if not lines:
            return
        with self._lock:
            self._spool_lines(lines)
        self._poke()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has ended
                loop.call_soon_threadsafe(wake.set)

    def close(self) -> None:
        self._stopping = True
        self._poke()
        self._thread.join()
        with self._lock:
            self.spool.close()

    # -- the publisher thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._ready.set()
        connector = asyncio.create_task(self._connect())
        retry_at = 0.0
        backoff = RETRY_MIN
        deadline: float | None = None
        try:
            while True:
                self._wake.clear()
                now = time.monotonic()
                if self._stopping and deadline is None:
                    deadline = now + self.close_timeout
                if self._stopping and (self.spool.records == 0 or now >= (deadline or 0)):
                    break
                if self._js is not None and self._nc.is_connected and self.spool.records and now >= retry_at:
                    try:
                        await self._send_some()
                        backoff = RETRY_MIN
                        continue
                    except Exception as e:  # timeouts, no responders during an election, a closed connection
                        self.stats.errors += 1
                        self._resync = True
                        retry_at = time.monotonic() + backoff
                        backoff = min(backoff * 2, RETRY_MAX)
                        log.debug("publish failed: %s: %s", type(e).__name__, e)
                connected = self._nc is not None and self._nc.is_connected
                # idle, or disconnected (a reconnect wakes the loop): wait for news; else until the retry is due
                wait = RETRY_MAX if not self.spool.records or not connected else max(0.01, retry_at - time.monotonic())
                if deadline is not None:
                    wait = min(wait, max(0.0, deadline - time.monotonic()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            connector.cancel()
            with contextlib.suppress(BaseException):
                await connector
            if self._nc is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._nc.close(), 2.0)
            self.stats.connected = False

    async def _connect(self) -> None:
        import nats

        async def on_error(e: Exception) -> None:
            log.debug("nats: %s: %s", type(e).__name__, e)

        async def on_disconnect() -> None:
            self.stats.connected = False

        async def on_reconnect() -> None:
            self.stats.connected = True
            self._resync = True
            self._poke()

        delay = RETRY_MIN
        while True:
            try:
                nc = await nats.connect(list(self.spec.servers), name=f"kwatch {self.host}", allow_reconnect=True,
                                        max_reconnect_attempts=-1, reconnect_time_wait=0.2, connect_timeout=2,
                                        error_cb=on_error, disconnected_cb=on_disconnect,
                                        reconnected_cb=on_reconnect)
                break
            except Exception as e:
                log.debug("nats connect: %s: %s", type(e).__name__, e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
        js = nc.jetstream(timeout=PUBLISH_TIMEOUT)
        while self.spec.create_stream:
            try:
                await ensure_stream(js, self.spec.stream, self.spec.subject_prefix, self.spec.replicas)
                break
            except Exception as e:
                self.stats.errors += 1
                log.warning("cannot create the JetStream stream %s: %s: %s", self.spec.stream, type(e).__name__, e)
                await asyncio.sleep(RETRY_MAX)
        self._nc, self._js = nc, js
        self.stats.connected = True
        self._poke()

    def _spool_lines(self, lines: Sequence[bytes]) -> None:
        """Append lines to the spool as batches (``_lock`` held); count and announce what a full spool refuses."""
        if self._spool_lost:
            # once full, the spool takes records again only when the server has taken half of it: one marker per
            # outage, not one per batch squeezed into the last free bytes
            if self.spool.bytes <= self.spool.max_bytes // 2 and self._append(
                [self.loss_marker(self._spool_lost, "the spool was full").line]
            ):
                log.warning("output %s: %d records lost: the spool was full", self.spec.name, self._spool_lost)
                self._spool_lost = 0
            else:
                self._spool_lost += len(lines)
                self.stats.lost += len(lines)
                return
        for batch_lines in fleet.chunk_lines(lines):
            if not self._append(batch_lines):
                self._spool_lost += len(batch_lines)
                self.stats.lost += len(batch_lines)

    def _append(self, lines: list[bytes]) -> bool:
        batch = fleet.Batch(self.boot, self.seq.next, len(lines), b"".join(lines))
        try:
            ok = self.spool.append(batch)
        except OSError as e:
            self.stats.errors += 1
            log.warning("output %s: spool write failed: %s", self.spec.name, e)
            return False
        if ok:
            self.seq.take(len(lines))
        return ok

    def _send_bytes(self) -> int:
        """The largest message body: :data:`SEND_BYTES`, less where the server allows less (its ``max_payload``) or
        the stream refused more."""
        server_max = getattr(self._nc, "max_payload", 0) or SEND_BYTES
        return max(1, min(SEND_BYTES, server_max - HEADER_ROOM, self._send_max))

    async def _send_some(self) -> None:
        """Send spooled batches in order, one message in flight, until the spool is empty (or, closing, after each
        message). A message is the oldest spooled batches merged, up to :meth:`_send_bytes`: a batch is what one
        ``write`` brought, often a few records, and one small message per acknowledgement held the publisher to
        a few thousand records/s. A message that failed is sent again with the same batches, so its id (its first
        record's) always names the same records."""
        import nats.js.errors

        js = self._js
        while self.spool.records:
            if self._resync:
                upto = await self._stored_upto()
                self._resync = False
                with self._lock:
                    records, body = self.spool.drop_stored(functools.partial(fleet.already_stored, upto=upto))
                if records:
                    # the server stored them and the acknowledgement was lost (a leader change, a daemon killed
                    # before the ack): stored is stored, and the records total must reach what was written
                    self.stats.records += records
                    self.stats.already_stored += records
                    self.stats.bytes += body
                    self._retry_frames = 0
            with self._lock:
                got = self.spool.head_run(self._send_bytes(), self._retry_frames or SEND_BATCHES_MAX)
            if got is None:
                return
            batch, n = got
            self._retry_frames = n
            try:
                await js.publish(self.subject, batch.body, timeout=PUBLISH_TIMEOUT, headers=batch.headers(self.host))
            except nats.js.errors.APIError:
                # the server answered with an error, so nothing was stored: a stream made with a smaller
                # max_msg_size refuses a merged message, and sending it again would fail forever. Merge less.
                if n > 1:
                    self._send_max = max(1, len(batch.body) // 2)
                    self._retry_frames = 0
                raise
            self._retry_frames = 0
            with self._lock:
                self.spool.pop(n)
            self.stats.records += batch.count
            self.stats.bytes += len(batch.body)
            if self._stopping:
                return  # the loop checks the close deadline

    async def _stored_upto(self) -> tuple[str, int] | None:
        import nats.js.errors

        try:
            msg = await self._js.get_last_msg(self.spec.stream, self.subject)
        except nats.js.errors.NotFoundError:
            return None
        return fleet.stored_upto(msg.headers)

