"""Throughput of the BPF consumer: the record decoder alone, and the whole BpfSource path under the churn workload.

Owns:

- :func:`decode_bench`: records per second of ``kwatch.capture.record.decode_batch`` on synthetic records laid out as
  the ring buffer holds them (``KwEvent`` header then the slot strings, 8-byte aligned), for two mixes: every record
  a single resolved path, and the churn mix (CREATE and UNLINK as directory + name, CLOSE_WRITE as one path).
  Target: >= 1M records/s.
- :func:`e2e_bench`: ``bench.consumer`` (a BpfSource read in a loop, counting) while ``bench/churn`` runs flat out
  (one producer, then one per CPU) and paced at a fixed total event rate (default 200k events/s, the target for zero
  losses): events expected (3 per iteration), delivered and lost, the rate the producers really reached, delivered
  events per second of wall time, consumer CPU. If the producers cannot reach the paced rate on this machine, the
  result says so (``produced_events_per_s``) rather than pretending.
"""

from __future__ import annotations

import ctypes
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import BenchError, Runner, empty_dir, wait_quiet
from bench.observers import KwatchCount, RunCtx
from bench.workloads import ChurnWorkload, run_churn_parallel


def _record(op: int, slots: list[bytes]) -> bytes:
    from kwatch.capture.record import SLOTS, KwEvent

    ev = KwEvent()
    ev.ts_ns = 123456789
    ev.cgroup_id = 1
    ev.pid = ev.tid = 4242
    ev.ppid = 1
    ev.op = op
    ev.mode = 0o644
    ev.ftype = 0o100000
    ev.comm = b"churn"
    lens = (ctypes.c_uint16 * SLOTS)(*[len(s) for s in slots] + [0] * (SLOTS - len(slots)))
    ev.len = lens
    body = bytes(ev) + b"".join(slots)
    return body


def synthetic_batch(n: int, mix: str) -> tuple[bytes, list[int]]:
    """``n`` records in ring buffer layout (8-byte record header, body, 8-byte alignment) and their body offsets."""
    from kwatch.events import Op

    base = b"/tmp/kwatch-bench-xxxxxx/watched/linux-source-6.1/fs/ext4"
    if mix == "single":
        kinds = [(int(Op.CLOSE_WRITE), [base + b"/inode.c"])]
    elif mix == "churn":
        kinds = [
            (int(Op.CREATE), [base, b"c17"]),
            (int(Op.CLOSE_WRITE), [base + b"/c17"]),
            (int(Op.UNLINK), [base, b"c17"]),
        ]
    else:
        raise ValueError(mix)
    recs = [_record(op, slots) for op, slots in kinds]
    parts = []
    offsets = []
    pos = 0
    for i in range(n):
        body = recs[i % len(recs)]
        rec = len(body).to_bytes(4, "little") + b"\0\0\0\0" + body
        rec += b"\0" * (-len(rec) % 8)
        offsets.append(pos + 8)
        parts.append(rec)
        pos += len(rec)
    return b"".join(parts), offsets


def _time_decoder(
    decode: Callable[[memoryview, list[int]], list[Any]], scan: Callable[[memoryview, int], list[int]], n: int,
    reps: int, mix: str,
) -> dict[str, Any]:
    buf, offsets = synthetic_batch(n, mix)
    view = memoryview(buf)
    evs = decode(view, offsets[:3])
    assert evs[0].path.startswith(b"/tmp/"), evs[0]
    assert scan(view, len(buf)) == offsets
    times, cpu, whole = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        c0 = time.thread_time()
        decode(view, offsets)
        cpu.append(time.thread_time() - c0)
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        decode(view, scan(view, len(buf)))
        whole.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {
        "records_per_s": round(n / med),
        # per second of this thread's CPU: less disturbed than wall time when other work shares the CPUs
        "records_per_cpu_s": round(n / statistics.median(cpu)),
        # the least CPU of the repetitions: other work only ever adds to it (cache, steal), so it is the steadiest
        # figure of a short run on a shared machine, the one a ratio of two decoders should use
        "best_records_per_cpu_s": round(n / min(cpu)),
        "best_records_per_s": round(n / min(times)),
        "median_s": round(med, 4),
        # the ring buffer walk (record headers) plus the decode: what RingBuffer.drain does per batch
        "scan_decode_per_s": round(n / statistics.median(whole)),
    }


def decode_bench(n: int = 200_000, reps: int = 5) -> dict[str, Any]:
    """Records/s of the decoder in use (C when built) and of the Python reference decoder, both record mixes."""
    from kwatch.capture import record, ringbuf

    def scanner(walk: Callable[..., tuple[list[int], int]]) -> Callable[[memoryview, int], list[int]]:
        return lambda view, end: walk(view, 0, end, (1 << 62) - 1, 1 << 30)[0]

    py_scan = scanner(ringbuf.scan)

    out: dict[str, Any] = {"records": n, "reps": reps, "decoder": "c" if record.recordc is not None else "python"}
    scan = scanner(record.recordc.scan) if record.recordc is not None else py_scan
    for mix in ("single", "churn"):
        out[mix] = _time_decoder(record.decode_batch, scan, n, reps, mix)
    if record.recordc is not None:
        out["python"] = {
            mix: _time_decoder(record.decode_batch_py, py_scan, n, reps, mix) for mix in ("single", "churn")
        }
    return out


def e2e_bench(
    runner: Runner, watch: Path, tmp: Path, *, iterations: int, paced_rate_events: float, paced_seconds: float,
    procs: int = 2, timeout: float = 300.0, repeat_first: int = 1,
) -> dict[str, Any]:
    """The consumer against the churn: one producer flat out, ``procs`` producers flat out, and ``procs`` producers
    paced to ``paced_rate_events`` in total for ``paced_seconds``; see the module docstring.

    The single flat-out producer runs ``repeat_first`` times: its entry is the run with the least consumer CPU per
    workload CPU, and ``repeats`` lists every run's share and loss (a loss in any of them is a loss)."""
    results: dict[str, Any] = {}
    churn_rate = paced_rate_events / 3 / procs
    runs = {
        "churn_flat_out_1": (ChurnWorkload(iterations), 1),
        f"churn_flat_out_{procs}": (ChurnWorkload(iterations // procs), procs),
        "churn_paced": (ChurnWorkload(int(churn_rate * paced_seconds), rate=churn_rate), procs),
        # one CHMOD per syscall: the cheapest producer, to offer the consumer the target rate on a slow machine
        "chmod_paced": (ChurnWorkload(int(paced_rate_events / procs * paced_seconds),
                                      rate=paced_rate_events / procs, mode="chmod"), procs),
        f"chmod_flat_out_{procs}": (ChurnWorkload(iterations * 3 // procs, mode="chmod"), procs),
    }
    schedule = [(name, wl, n) for name, (wl, n) in runs.items()
                for _ in range(repeat_first if name == "churn_flat_out_1" else 1)]
    repeats: dict[str, list[dict[str, Any]]] = {}
    for name, wl, n in schedule:
        obs = KwatchCount("bpf")
        ctx = RunCtx(runner, watch, tmp, f"e2e-{name}")
        empty_dir(watch)
        dests = [watch / f"p{k}" for k in range(n)]
        for d in dests:
            d.mkdir()
        obs.start(ctx)
        try:
            t0 = time.monotonic()
            loop_s, _, churn_cpu = run_churn_parallel(runner, wl, dests, timeout)
            wall = time.monotonic() - t0
            settle = wait_quiet(obs.pids(), 60.0)
            res = obs.stop()
        except BaseException:
            obs.abort()
            raise
        if not obs.out.exists():
            raise BenchError("consumer wrote no counts")
        d = json.loads(obs.out.read_text())
        timed = wl.iterations * wl.events_per_iter * n
        expected = timed + wl.setup_events * n
        span = max(wall, (d["last_batch"] or t0) - t0)
        entry = {
            "producers": n,
            "mode": wl.mode,
            "iterations": wl.iterations * n,
            "target_events_per_s": paced_rate_events if wl.rate else None,
            "produced_events_per_s": round(timed / loop_s),
            "expected_events": expected,
            "delivered_events": res.events,
            "lost": res.lost,
            "loss_markers": d["loss_markers"],
            "delivered_per_s": round((res.events or 0) / span) if span else None,
            "workload_s": round(loop_s, 3),
            "workload_cpu_s": round(churn_cpu, 3),
            "consumer_cpu_s": round(res.cpu_s, 3),
            "consumer_cpu_us_per_event": round(res.cpu_s / res.events * 1e6, 2) if res.events else None,
            "settle_s": round(settle, 2),
        }
        share = res.cpu_s / churn_cpu if churn_cpu else None
        repeats.setdefault(name, []).append({"consumer_share": round(share, 4) if share else None, "lost": res.lost})
        best = results.get(name)
        if best is None or (share and best["workload_cpu_s"]
                            and share < best["consumer_cpu_s"] / best["workload_cpu_s"]):
            results[name] = entry
    for name, reps in repeats.items():
        if len(reps) > 1:
            results[name]["repeats"] = reps
    empty_dir(watch)
    return results
