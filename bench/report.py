"""Benchmark output: Markdown tables, JSON, the ratio chart, and the generated sections of docs/benchmarks.md.

Pure formatting apart from the file writes at the end (:func:`write_capture`, :func:`update_section`). ``--write-readme``
rewrites :data:`BENCH_DOC` (docs/benchmarks.md, not the README: the README keeps a short, hand-written targets
table), and only between a suite's markers, e.g. ``<!-- bench:capture:start -->`` and ``<!-- bench:capture:end -->``;
without both markers the file is left alone. Every suite writes through :func:`update_section`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bench.common import OUT, REPO

#: The file whose generated sections ``--write-readme`` rewrites.
BENCH_DOC = REPO / "docs" / "benchmarks.md"
README_START = "<!-- bench:capture:start -->"
README_END = "<!-- bench:capture:end -->"
HOOK_LABELS = {
    "tp": "empty BPF program on `tp/syscalls/sys_exit_fchmod` (the kind kwatch uses)",
    "raw_tp": "empty BPF program on `raw_tp/sys_exit`",
    "tp_btf": "empty BPF program on `tp_btf/sys_exit`",
    "tp_record": "`tp/syscalls/sys_exit_fchmod` program writing the least record (clock + 16-byte ring record)",
}


def _f(x: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if x is None else fmt.format(x)


def _n(x: float | int | None) -> str:
    return "-" if x is None else f"{int(x):,}"


def machine_line(m: dict[str, Any]) -> str:
    return (f"{m['date']}; {m['nproc']} CPUs ({m['cpu']}), {m['mem_gib']} GiB, Linux {m['kernel']}; "
            f"load average at start {', '.join(str(x) for x in m['loadavg_at_start'])}; kwatch {m['kwatch_commit']}")


def capture_markdown(res: dict[str, Any]) -> str:
    m = res["machine"]
    p = res["params"]
    wl = res["workloads"]
    lines = [
        f"Measured {machine_line(m)}.",
        "",
        f"Workloads on {'a tmpfs' if res['fs'] == 'tmpfs' else 'ext4 (/var/tmp)'}: **untar** = `tar -xf` of the fixed "
        f"subset of {wl['untar']['package']} ({_n(wl['untar']['files'])} files, {_n(wl['untar']['dirs'])} dirs, "
        f"{wl['untar']['bytes'] / 1e6:.0f} MB, sha256 `{wl['untar']['sha256'][:12]}`) x {wl['untar']['repeat']}; "
        f"**churn** = {_n(wl['churn']['iterations'])} x (create, write 64 B, close, unlink). "
        f"Median of {p['runs']} alternating runs per configuration.",
        "",
        "| workload | observer | wall s | x none | workload CPU s | CPU x none | observer CPU s | events seen | lost "
        "| runs |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["summary"]:
        label = r["label"] + (" ¹" if r["scope"] == "system" else "")
        if not r["runs"]:
            err = (r["errors"] or ["no run"])[0].splitlines()[0][:80]
            lines.append(f"| {r['workload']} | {label} | failed: {err} | | | | | | | 0 |")
            continue
        lost = "n/a" if r["lost"] is None else _n(r["lost"])
        lines.append(
            f"| {r['workload']} | {label} | {_f(r['wall_s'])} | {_f(r['ratio'], '{:.3f}')} | "
            f"{_f(r['workload_cpu_s'], '{:.2f}')} | {_f(r['cpu_ratio'], '{:.3f}')} | "
            f"{_f(r['observer_cpu_s'], '{:.2f}')} | {_n(r['events'])} | "
            f"{lost} | {r['runs']} |"
        )
    lines += [
        "",
        "¹ whole system (the tool cannot be limited to the tree): its events include other processes' activity.",
        "wall s: the workload's wall time; x none: over the median with no observer; workload CPU: the workload "
        "processes' user+system time (in-kernel capture work such as BPF programs and audit records is charged "
        "there; less sensitive than wall time to other load on the machine, CPU x none is its ratio); observer CPU: the observer's processes (and its line counter / kauditd). events seen: kwatch: "
        "events delivered; inotifywait, fatrace, bpftrace: output lines; auditd: SYSCALL records with the rule's "
        "key. lost: what the tool reports (n/a: it cannot say).",
    ]
    if res.get("not_measured"):
        lines += ["", "Not measured: " + "; ".join(f"{k}: {v}" for k, v in res["not_measured"].items()) + "."]
    tp = res.get("throughput") or {}
    if "decode" in tp:
        d = tp["decode"]
        lines += ["", "| BPF consumer | figure |", "|---|---:|"]
        decoders = [(d.get("decoder", "python"), d)]
        if "python" in d:
            decoders.append(("python", d["python"]))
        for name, dd in decoders:
            for mix, label in (("single", "single-path records"), ("churn", "churn mix (dir+name, path, dir+name)")):
                m = dd[mix]
                whole = m.get("scan_decode_per_s")
                lines.append(
                    f"| `decode_batch` ({name} decoder), {label} | {_n(m['records_per_s'])} records/s (median), "
                    f"{_n(m.get('best_records_per_s'))} best, {_n(m.get('records_per_cpu_s'))} per CPU-s"
                    + (f"; with the ring walk {_n(whole)} records/s" if whole else "") + " |"
                )
        hooks = tp.get("hooks") or {}
        if "error" in hooks:
            lines.append(f"| empty BPF program per syscall | not measured: {hooks['error']} |")
        for name, h in (hooks.get("over_none_ns") or {}).items():
            lines.append(
                f"| {HOOK_LABELS.get(name, name)} | +{h['watched_call']:.0f} ns per watched "
                f"call (fchmod), +{h['other_call']:.0f} ns per other syscall (pwrite) |"
            )
        e2e = tp.get("e2e") or {}
        if "error" in e2e:
            lines.append(f"| BpfSource end to end | not measured: {e2e['error']} |")
        for name, e in e2e.items():
            if name == "error":
                continue
            what = ("flat out" if e["target_events_per_s"] is None
                    else f"paced to {_n(e['target_events_per_s'])} ev/s")
            lines.append(
                f"| BpfSource + {e['producers']} x {e['mode']} {what} | produced {_n(e['produced_events_per_s'])} "
                f"ev/s, delivered {_n(e['delivered_events'])} of {_n(e['expected_events'])} "
                f"({_n(e['delivered_per_s'])} ev/s), lost {_n(e['lost'])}, consumer "
                f"{_f(e['consumer_cpu_us_per_event'], '{:.1f}')} CPU-us/event |"
            )
    return "\n".join(lines) + "\n"


def capture_chart(res: dict[str, Any], path: Path) -> str | None:
    """A bar chart of the wall-time ratios; returns why not if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (needs a `bench` extra in pyproject.toml)"
    rows = [r for r in res["summary"] if r["ratio"] is not None and r["observer"] != "none"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    labels = list(dict.fromkeys(r["label"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(workloads))
    for i, wl in enumerate(workloads):
        vals = {r["label"]: r["ratio"] for r in rows if r["workload"] == wl}
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [vals.get(lb, 0) for lb in labels], width, label=wl)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.05, color="green", linewidth=0.8, linestyle="--", label="+5% target")
    ax.set_xticks([j + width * (len(workloads) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("workload wall time / no observer")
    ax.set_title(f"kwatch capture overhead ({res['machine']['date']}, {res['machine']['nproc']} CPUs)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_capture(res: dict[str, Any], out: Path = OUT) -> dict[str, str]:
    """Write capture.md, capture.json and capture.png under ``out``; returns what was written (or why not)."""
    out.mkdir(parents=True, exist_ok=True)
    md = capture_markdown(res)
    (out / "capture.md").write_text("# kwatch capture benchmark\n\n" + md)
    (out / "capture.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    written = {"markdown": str(out / "capture.md"), "json": str(out / "capture.json")}
    why = capture_chart(res, out / "capture.png")
    written["chart"] = why or str(out / "capture.png")
    return written


def replace_section(text: str, body: str, start: str = README_START, end: str = README_END) -> str | None:
    """``text`` with what lies between the markers replaced by ``body``; None when the markers are missing."""
    i = text.find(start)
    j = text.find(end, i + len(start)) if i >= 0 else -1
    if i < 0 or j < 0:
        return None
    return text[: i + len(start)] + "\n" + body.rstrip("\n") + "\n" + text[j:]


def update_section(body: str, start: str, end: str, doc: Path = BENCH_DOC) -> str:
    """Put ``body`` into ``doc`` between the markers ``start`` and ``end`` (atomically); returns what happened."""
    if not doc.exists():
        return f"{doc} does not exist; not written"
    new = replace_section(doc.read_text(), body, start, end)
    if new is None:
        return f"{doc} has no {start} ... {end} section; not written"
    tmp = doc.with_name(doc.name + ".bench-tmp")
    tmp.write_text(new)
    os.replace(tmp, doc)
    return f"updated {start} ... {end} in {doc}"


def publish(name: str, md: str, result: dict[str, Any], out: Path, *, write_doc: bool, marker: str | None = None) -> str:
    """A suite's results: ``out/NAME.md`` and ``out/NAME.json``, the table printed, and with ``write_doc`` put into
    docs/benchmarks.md between ``<!-- bench:MARKER:start -->`` and ``<!-- bench:MARKER:end -->`` (MARKER: ``name``).
    Returns what happened to the doc ("" when not asked)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(md)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    print(md)
    if not write_doc:
        return ""
    m = marker or name
    return update_section(md, f"<!-- bench:{m}:start -->", f"<!-- bench:{m}:end -->")


def update_readme(res: dict[str, Any], doc: Path = BENCH_DOC) -> str:
    """Put the capture table into docs/benchmarks.md (the name is the ``--write-readme`` option's)."""
    return update_section(capture_markdown(res), README_START, README_END, doc)


def replicate_chart(res: dict[str, Any], path: Path) -> str | None:
    """Bars of time-to-identical over the one-shot rsync, per workload and tool; returns why not if it cannot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (the `bench` extra in pyproject.toml)"
    rows = [r for r in res["summary"] if r.get("ratio_oneshot") is not None and r["tool"] != "oneshot"]
    workloads = list(dict.fromkeys(r["workload"] for r in rows))
    tools = list(dict.fromkeys(r["tool"] for r in rows))
    if not rows:
        return "no ratios to draw"
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(workloads))
    for i, wl in enumerate(workloads):
        vals = {r["tool"]: r["ratio_oneshot"] for r in rows if r["workload"] == wl}
        ax.bar([j + i * width for j in range(len(tools))], [vals.get(t, 0) for t in tools], width, label=wl)
    ax.axhline(1.0, color="black", linewidth=0.8, label="one-shot rsync -a --delete")
    ax.axhline(1.5, color="green", linewidth=0.8, linestyle="--", label="1.5x target (untar)")
    ax.set_xticks([j + width * (len(workloads) - 1) / 2 for j in range(len(tools))])
    ax.set_xticklabels(tools, rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")  # lsyncd's rename is 80x: a linear axis hides everything else
    ax.set_ylabel("time to identical mirror / one-shot rsync (log)")
    ax.set_title(f"kwatch replication ({res['machine']['date']}, {res['machine']['nproc']} CPUs)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
