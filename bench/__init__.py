"""kwatch benchmarks: run with ``python -m bench.run`` (``make bench``, ``make bench-quick``, ``make bench-capture``).

Where everything lives:

- ``bench.run``        the entry point: arguments, which suites run, where results go (``bench/out/``).
- ``bench.common``     timing and process helpers shared by every suite: alternating runs, medians, ratios, CPU
                       seconds and peak RSS of observer processes, a bounded runner that only ever kills what it
                       started, a cleanup stack, tmpfs mounts, machine description.
- ``bench.workloads``  the deterministic workloads: the fixed subset tar of Debian's ``linux-source-6.1`` (downloaded
                       into ``bench/cache/``, gitignored) and the create/write/close/unlink churn (``bench/churn.c``).
- ``bench.observers``  how each observer of the capture suite (kwatch, inotifywait, fatrace, auditd, bpftrace) is
                       started, known ready, stopped and counted.
- ``bench.consumer``   the counting kwatch consumer (a Source read in a loop, events counted, nothing printed).
- ``bench.linecount``  counts the lines a printing observer writes (its stdout is piped here instead of a terminal).
- ``bench.throughput`` decode micro-benchmark of the BPF record decoder and end-to-end BpfSource events/s.
- ``bench.capture``    the capture overhead suite (ties the above together).
- ``bench.report``     Markdown/JSON/PNG output and the generated sections of docs/benchmarks.md.
- ``bench.replicate``  the replication suite (with ``bench.netcount``, its counting loopback proxy); owned separately,
                       reached through ``bench.run`` as ``replicate.main(args, out)``.
- ``bench.delta_bench`` the delta engine micro-benchmark (standalone script, owned separately).
"""
