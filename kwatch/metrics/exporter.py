"""Prometheus exposition: a collector that reads :class:`DaemonStats` at scrape time, and the HTTP endpoint."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from kwatch.metrics.stats import DOWN_REASONS, DaemonStats, TargetStats


class KwatchCollector(Collector):
    def __init__(self, stats: DaemonStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats
        ev = CounterMetricFamily("kwatch_events", "File events captured", labels=["op", "backend"])
        for (op, backend), n in sorted(s.events.items()):
            ev.add_metric([op, backend], n)
        yield ev
        lost = CounterMetricFamily("kwatch_events_lost", "Events the kernel or a queue dropped", labels=["backend"])
        for backend, n in sorted(s.lost.items()):
            lost.add_metric([backend], n)
        yield lost
        rm = CounterMetricFamily("kwatch_rule_matches", "Events that matched a rule", labels=["rule"])
        for rule, n in sorted(s.rule_matches.items()):
            rm.add_metric([rule], n)
        yield rm
        act = CounterMetricFamily("kwatch_actions", "Action commands by result", labels=["rule", "result"])
        for (rule, result), n in sorted(s.actions.items()):
            act.add_metric([rule, result], n)
        yield act
        h = s.action_latency
        hist = HistogramMetricFamily("kwatch_action_latency_seconds", "From event to action start")
        hist.add_metric([], h.cumulative(), sum_value=h.total)
        yield hist
        q = GaugeMetricFamily("kwatch_queue_depth", "Items waiting", labels=["queue"])
        for name, fn in sorted(s.queues.items()):
            q.add_metric([name], fn())
        yield q
        yield GaugeMetricFamily("kwatch_config_reloads", "SIGHUP reloads done", value=s.reloads)
        yield GaugeMetricFamily(
            "kwatch_config_reload_errors", "SIGHUP reloads refused (the config had errors)", value=s.reload_errors
        )
        b = s.barrier
        barrier = {
            "calls": ("Replicator checks that every event made before them was read", b.calls),
            "waits": ("Barrier checks that had to wake the capture loop", b.waits),
            "timeouts": ("Barrier checks that timed out (the reads they covered are sent again later)", b.timeouts),
            "wait_seconds": ("Seconds replicators spent waiting on the capture barrier", b.wait_seconds),
        }
        for name, (doc, value) in barrier.items():
            c = CounterMetricFamily(f"kwatch_capture_barrier_{name}", doc)
            c.add_metric([], value)
            yield c
        yield from self._targets()
        yield from self._outputs()

    def _targets(self) -> Iterator[Metric]:
        ts = sorted(self.stats.targets.values(), key=lambda t: t.name)
        gauges = {
            "lag_seconds": "Seconds the mirror is behind the oldest unsent change",
            "pending_paths": "Paths waiting to be sent",
            "failed_paths": "Paths waiting to be sent again after a transient error of the mirror (ENOSPC, EIO...)",
        }
        yield from _per_target(GaugeMetricFamily, gauges, ts)
        up = GaugeMetricFamily("kwatch_replication_connected", "1 while the target's transport is up", labels=["target"])
        for t in ts:
            up.add_metric([t.name], 1.0 if t.connected else 0.0)
        yield up
        down = GaugeMetricFamily("kwatch_replication_down", "1 for the reason the target is down (all 0 while up)",
                                 labels=["target", "reason"])
        for t in ts:
            for reason in DOWN_REASONS:
                down.add_metric([t.name, reason], 1.0 if t.down == reason else 0.0)
        yield down
        by = CounterMetricFamily("kwatch_replication_bytes", "Bytes of file data", labels=["target", "kind"])
        for t in ts:
            by.add_metric([t.name, "literal"], t.bytes_literal)
            by.add_metric([t.name, "matched"], t.bytes_matched)
            by.add_metric([t.name, "wire"], t.bytes_wire)
        yield by
        counters = {
            "files": "Files sent",
            "renames": "Renames replayed",
            "deletes": "Deletes applied",
            "errors": "Per-path errors",
            "reconnects": "Transport reconnects",
            "batches": "Batches committed",
            "retries": "Paths sent again after a transient error of the mirror",
        }
        yield from _per_target(CounterMetricFamily, counters, ts)
        rescans = CounterMetricFamily("kwatch_replication_rescans", "Reconciles by scan: the whole tree or a subtree",
                                      labels=["target", "scope"])
        for t in ts:
            rescans.add_metric([t.name, "full"], t.rescans_full)
            rescans.add_metric([t.name, "subtree"], t.rescans_subtree)
        yield rescans


    def _outputs(self) -> Iterator[Metric]:
        al = CounterMetricFamily("kwatch_alerts", "Alert records raised by rules", labels=["rule"])
        for rule, n in sorted(self.stats.alerts.items()):
            al.add_metric([rule], n)
        yield al
        outs = sorted(self.stats.outputs.values(), key=lambda o: o.name)
        counters = {
            "records": "Records written to the output (nats: stored by the server)",
            "already_stored": "Records found stored after a lost acknowledgement (nats), not sent again",
            "bytes": "Bytes written to the output",
            "errors": "Failed writes, sends or publishes",
            "lost": "Records that never reached the output (each loss also announced by a marker record)",
            "skipped": "Records of the output's own server's file operations, left out to avoid feedback",
            "rotations": "File rotations",
            "fsyncs": "fsync calls",
            "repaired_bytes": "Bytes of a torn last line cut off when the file was opened again",
        }
        for attr, doc in counters.items():
            c = CounterMetricFamily(f"kwatch_output_{attr}", doc, labels=["output", "kind"])
            for o in outs:
                c.add_metric([o.name, o.kind], getattr(o, attr))
            yield c
        up = GaugeMetricFamily("kwatch_output_connected", "1 while the output can be written", labels=["output", "kind"])
        backlog = GaugeMetricFamily("kwatch_output_backlog", "Records waiting to be sent", labels=["output", "kind"])
        spool = GaugeMetricFamily("kwatch_output_spool_bytes", "Bytes in the on-disk spool", labels=["output", "kind"])
        for o in outs:
            up.add_metric([o.name, o.kind], 1.0 if o.connected else 0.0)
            backlog.add_metric([o.name, o.kind], o.backlog() if o.backlog is not None else 0)
            spool.add_metric([o.name, o.kind], o.backlog_bytes() if o.backlog_bytes is not None else 0)
        yield up
        yield backlog
        yield spool


def serve(stats: DaemonStats, address: str) -> CollectorRegistry:
    """Start the /metrics endpoint on ``host:port`` (a background thread); returns its registry."""
    host, _, port = address.rpartition(":")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KwatchCollector(stats))
    start_http_server(int(port), addr=host.strip("[]") or "127.0.0.1", registry=registry)
    return registry


def _per_target(family: type[GaugeMetricFamily] | type[CounterMetricFamily], docs: dict[str, str],
                ts: list[TargetStats]) -> Iterator[Metric]:
    """One ``kwatch_replication_<attr>`` family per entry of ``docs`` (attribute -> help), a sample per target."""
    for attr, doc in docs.items():
        m = family(f"kwatch_replication_{attr}", doc, labels=["target"])
        for t in ts:
            m.add_metric([t.name], getattr(t, attr))
        yield m
