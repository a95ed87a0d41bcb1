"""The progress of a reconcile (kwatch.replicate.progress): figures, renderings, pacing."""

from __future__ import annotations

import io

import pytest

from kwatch.daemon.status import format_status
from kwatch.replicate.progress import Pacer, Progress, live_line, log_line


def made(files_total: int, bytes_total: int, *steps: tuple[int, int, float]) -> Progress:
    p = Progress(files_total, bytes_total, started=100.0)
    for files, nbytes, now in steps:
        p.advance(files, nbytes, now)
    return p


# name, progress, (bytes_per_s, files_per_s, eta)
CASES = [
    ("nothing sent yet", made(10, 1000), (0.0, 0.0, None)),
    ("half the bytes in 2 s", made(10, 1000, (4, 500, 102.0)), (250.0, 2.0, 2.0)),
    ("done", made(10, 1000, (10, 1000, 104.0)), (250.0, 2.5, 0.0)),
    ("empty files only: by files", made(4, 0, (1, 0, 101.0)), (0.0, 1.0, 3.0)),
    ("an empty tree", made(0, 0), (0.0, 0.0, 0.0)),
    ("never backwards (a dropped read)", made(10, 1000, (6, 600, 101.0), (5, 500, 102.0)), (300.0, 3.0, 4 / 3)),
    ("a file grew since the plan: the total follows", made(2, 100, (2, 150, 101.0)), (150.0, 2.0, 0.0)),
]


@pytest.mark.parametrize("name,p,want", CASES, ids=[c[0] for c in CASES])
def test_figures(name: str, p: Progress, want: tuple[float, float, float | None]) -> None:
    rate, files_rate, eta = want
    assert p.bytes_per_s == pytest.approx(rate)
    assert p.files_per_s == pytest.approx(files_rate)
    assert p.eta == (None if eta is None else pytest.approx(eta))
    assert p.files_done <= p.files_total and p.bytes_done <= p.bytes_total


def test_log_line_is_key_value_and_round_trips() -> None:
    p = made(10, 1000, (4, 500, 102.0))
    line = log_line("host:/m x", p, done=False)
    assert line.startswith("progress target=\"host:/m x\" ")
    fields = dict(kv.split("=", 1) for kv in line.split(" ", 2)[2].split(" ")[1:])
    assert fields == {"files": "4", "files_total": "10", "bytes": "500", "bytes_total": "1000", "bytes_per_s": "250",
                      "files_per_s": "2.0", "elapsed_s": "2.0", "eta_s": "2.0", "done": "0"}
    assert "eta_s=- " in log_line("t", made(10, 1000))


def test_live_line() -> None:
    p = made(5479, 126_000_000, (1234, 12_300_000, 100.5))
    assert live_line("/m", p) == "/m: 1,234/5,479 files, 12.3/126.0 MB, 24.6 MB/s, 5s left"
    assert live_line("/m", made(1, 1)).endswith("? left")
    assert live_line("/m", made(10, 3_000_000_000, (1, 1_000_000, 101.0))).endswith("49m59s left")


def test_pacer_shows_the_first_every_interval_and_the_last() -> None:
    pacer = Pacer(5.0)
    shown = [t for t in (0.0, 1.0, 4.9, 5.0, 9.0, 10.1) if pacer.due(t)]
    assert shown == [0.0, 5.0, 10.1]
    assert pacer.due(10.2, final=True)


def test_status_shows_a_reconcile_in_flight() -> None:
    target = {"name": "host:/m", "connected": True, "lag_seconds": 0.0, "pending_paths": 0, "files": 0,
              "batches": 0, "errors": 0, "reconnects": 0, "syncing": True, "sync_files": 1234,
              "sync_files_total": 5479, "sync_bytes": 12_300_000, "sync_bytes_total": 126_000_000,
              "sync_bytes_per_s": 24_600_000, "sync_eta_s": 4.6}
    out = io.StringIO()
    format_status({"targets": [target]}, out)
    assert "    reconciling: 1,234/5,479 files, 12.3/126.0 MB, 24.6 MB/s, 4s left\n" in out.getvalue()
    out = io.StringIO()
    format_status({"targets": [{**target, "syncing": False}]}, out)
    assert "reconciling" not in out.getvalue()
