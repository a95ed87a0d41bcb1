"""``kwatch collect``: read a fleet's records from JetStream with a durable consumer; print or archive them.

The consumer (``--durable NAME``, created when missing, explicit acks) remembers on the server what was acknowledged,
so a restarted collector goes on where it stopped. Messages are handled in the stream's order, which keeps each
host's order; a message is acknowledged only after its records were written (and, for an archive with
``fsync=every``, synced). Redeliveries are sorted out by the stream sequence number (:class:`Reorder`): one already
handled is acknowledged and skipped; one that arrives ahead of a missing predecessor (a delivery lost in a failover)
is held until the predecessor is redelivered, or ``gap_timeout`` passes (the predecessor was deleted from the
stream), whichever comes first.

A collector killed between writing and acknowledging writes those records again when it restarts (at least once).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from kwatch.outputs import fleet
from kwatch.outputs.bus import ensure_stream

FETCH_BATCH = 64
GAP_TIMEOUT = 65.0  # over two of JetStream's default ack_wait (30 s): a lost delivery comes back by then


@dataclass
class Reorder:
    """Stream-order delivery out of a consumer that may redeliver. Pure: the clock is passed in."""

    next_seq: int = 0  # the stream sequence expected next (0: take the first seen)
    held: dict[int, Any] = field(default_factory=dict)
    gap_since: float | None = None

    def push(self, seq: int, msg: Any, now: float) -> tuple[list[Any], list[Any]]:
        """(messages to handle now in order, duplicates to acknowledge and skip)."""
        if self.next_seq == 0:
            self.next_seq = seq
        if seq < self.next_seq or seq in self.held:
            return [], [msg]
        self.held[seq] = msg
        return self.release(now), []

    def release(self, now: float, gap_timeout: float = GAP_TIMEOUT) -> list[Any]:
        out = []
        while self.held:
            if self.next_seq in self.held:
                out.append(self.held.pop(self.next_seq))
                self.next_seq += 1
                self.gap_since = None
                continue
            if self.gap_since is None:
                self.gap_since = now
            if now - self.gap_since < gap_timeout:
                break
            self.next_seq = min(self.held)  # the missing ones are gone from the stream
            self.gap_since = None
        return out


async def _subscribe(js: Any, stream: str, durable: str, subject_prefix: str, order: Reorder) -> Any:
    """The durable pull consumer of ``stream``; ``order`` starts after what it acknowledged already (or at the
    stream's first message, when older ones are gone)."""
    import nats.js.api

    cfg = nats.js.api.ConsumerConfig(ack_policy=nats.js.api.AckPolicy.EXPLICIT,
                                     deliver_policy=nats.js.api.DeliverPolicy.ALL)
    psub = await js.pull_subscribe(f"{subject_prefix}.>", durable=durable, stream=stream, config=cfg)
    info = await psub.consumer_info()
    first = (await js.stream_info(stream)).state.first_seq
    floor = info.ack_floor.stream_seq if info.ack_floor is not None else 0
    order.next_seq = max(order.next_seq, floor + 1, first)
    return psub


async def collect(
    servers: Sequence[str],
    stream: str,
    durable: str,
    write: Callable[[list[bytes]], None],
    *,
    subject_prefix: str = "kwatch",
    create_stream: bool = False,
    replicas: int = 1,
    count: int | None = None,
    duration: float | None = None,
    stop: asyncio.Event | None = None,
    err: IO[str] = sys.stderr,
) -> int:
    """Hand the fleet's records to ``write`` (lists of JSON lines, in stream order) until stopped; returns how many."""
    import nats
    import nats.errors

    stop = stop or asyncio.Event()

    async def on_error(e: Exception) -> None:
        pass

    nc = await nats.connect(list(servers), name="kwatch collect", allow_reconnect=True, max_reconnect_attempts=-1,
                            reconnect_time_wait=0.2, connect_timeout=2, error_cb=on_error)
    js = nc.jetstream(timeout=5)
    deadline = None if duration is None else time.monotonic() + duration
    done = 0
    dups = 0
    order = Reorder()
    try:
        while True:
            try:
                if create_stream:
                    await ensure_stream(js, stream, subject_prefix, replicas)
                psub = await _subscribe(js, stream, durable, subject_prefix, order)
                break
            except Exception as e:
                if stop.is_set() or (deadline is not None and time.monotonic() > deadline):
                    return 0
                err.write(f"kwatch collect: waiting for the stream {stream}: {type(e).__name__}: {e}\n")
                await asyncio.sleep(1.0)
        while not stop.is_set() and (count is None or done < count):
            if deadline is not None and time.monotonic() >= deadline:
                break
            try:
                msgs = await psub.fetch(FETCH_BATCH, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                msgs = []
            except Exception as e:  # a failover: the consumer's leader moves, the connection drops
                err.write(f"kwatch collect: fetch: {type(e).__name__}: {e}\n")
                await asyncio.sleep(0.2)
                continue
            ready: list[Any] = []
            now = time.monotonic()
            for m in msgs:
                handle, skip = order.push(m.metadata.sequence.stream, m, now)
                ready.extend(handle)
                for s in skip:
                    dups += 1
                    with contextlib.suppress(Exception):
                        await s.ack()
            if not msgs:
                ready.extend(order.release(now))
            for m in ready:
                got = fleet.unpack(m.headers, m.data)
                lines = got[3] if got is not None else []
                if lines:
                    write(lines)
                    done += len(lines)
                with contextlib.suppress(Exception):
                    await m.ack()
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2.0)
    err.write(f"kwatch collect: {done} records, {dups} redelivered messages skipped\n")
    return done


def run_collect(servers: Sequence[str], stream: str, durable: str, write: Callable[[list[bytes]], None],
                **kw: Any) -> int:
    """:func:`collect` in an event loop of its own; SIGINT and SIGTERM stop it."""

    async def main() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return await collect(servers, stream, durable, write, stop=stop, **kw)

    return asyncio.run(main())
