"""The speed guard rails (bench/guards.py): a value past its bound fails, a missing value fails, typical ones pass."""

from __future__ import annotations

from typing import Any

import pytest

from bench.guards import GUARDS, check_all


def _churn_runs(none: list[float], bpf: list[float]) -> list[dict[str, Any]]:
    return ([{"workload": "churn", "observer": "none", "error": None, "workload_cpu_s": c} for c in none]
            + [{"workload": "churn", "observer": "kwatch-bpf-count", "error": None, "workload_cpu_s": c} for c in bpf]
            + [{"workload": "churn", "observer": "kwatch-bpf-count", "error": "failed", "workload_cpu_s": None}])


def _results(*, bpf_cpus: tuple[float, ...] = (1.1,), consumer: float = 0.3, repeats: tuple[int, ...] = (), c_rate: float = 4e6, py_rate: float = 4.5e5,
             pipe: float = 1.0, ssh: float = 0.6, oneshot: float = 0.6, push: float = 0.6, rsync: float = 0.9,
             lost: int = 0, once: float = 1.1, rsync_a: float = 1.0) -> dict[str, dict[str, Any]]:
    return {
        "capture": {
            "runs": _churn_runs([1.0, 1.3, 1.6], list(bpf_cpus)),
            "throughput": {
                "decode": {"churn": {"records_per_cpu_s": c_rate, "best_records_per_cpu_s": c_rate},
                           "python": {"churn": {"records_per_cpu_s": py_rate, "best_records_per_cpu_s": py_rate}}},
                "e2e": {"churn_flat_out_1": {"consumer_cpu_s": consumer, "workload_cpu_s": 1.5, "lost": lost,
                                             "repeats": [{"consumer_share": 0.3, "lost": x} for x in repeats]}},
            },
        },
        "replicate": {"summary": [{"workload": "untar", "tool": "kwatch-pipe", "identical_s": pipe},
                                  {"workload": "untar", "tool": "kwatch-ssh", "identical_s": ssh},
                                  {"workload": "untar", "tool": "oneshot", "identical_s": oneshot}]},
        "rsync": {"rows": [{"batch": "whole tree", "tool": "kwatch", "best_seconds": push},
                           {"batch": "whole tree", "tool": "rsync", "best_seconds": rsync}]},
        "firstsync": {"rows": [{"tree": "untar", "transport": "local", "tool": "kwatch", "best_seconds": once},
                               {"tree": "untar", "transport": "local", "tool": "rsync -a", "best_seconds": rsync_a}]},
    }


# (name, results, the guard that must fail, or None: all pass)
CASES: list[tuple[str, dict[str, dict[str, Any]], str | None]] = [
    ("typical_values_pass", _results(), None),
    ("capture_overhead_doubled", _results(bpf_cpus=(2.2,)), "capture overhead"),
    # the least of each observer's runs: one noisy run of the consumer does not fail the guard, nor a noisy baseline
    ("capture_overhead_one_noisy_run", _results(bpf_cpus=(1.7, 1.1, 2.5)), None),
    ("capture_overhead_doubled_in_every_run", _results(bpf_cpus=(2.1, 2.2, 2.4)), "capture overhead"),
    ("capture_overhead_no_run", _results(bpf_cpus=()), "capture overhead"),
    ("consumer_lost_events_in_a_repeat", _results(repeats=(0, 5, 0)), "capture consumer CPU"),
    ("consumer_twice_as_slow", _results(consumer=0.6), "capture consumer CPU"),
    ("consumer_lost_events", _results(lost=3), "capture consumer CPU"),
    ("c_decoder_twice_as_slow", _results(c_rate=2e6), "decoder speed-up"),
    ("replication_twice_as_slow", _results(pipe=2.0, ssh=1.2), "replication vs one-shot"),
    ("first_sync_twice_as_slow", _results(push=1.9), "first sync vs rsync"),
    ("agent_first_sync_with_the_idle_second", _results(once=17.0), "first sync vs rsync -a (local agent"),
    ("a_suite_missing", {k: v for k, v in _results().items() if k != "rsync"}, "first sync vs rsync"),
    ("a_value_missing", {**_results(), "replicate": {"summary": []}}, "replication vs one-shot"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_guards(case: tuple[str, dict[str, dict[str, Any]], str | None]) -> None:
    _name, results, failing = case
    ok, lines = check_all(results)
    failed = [line for line in lines if not line.endswith(" ok")]
    assert len(lines) == len(GUARDS)
    if failing is None:
        assert ok and not failed, lines
    else:
        assert not ok
        assert [line for line in failed if line.startswith(failing)], lines
