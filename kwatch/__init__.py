"""kwatch: kernel-level file change capture, rules with safe actions, and realtime replication.

Where everything lives (data flows one way, top to bottom):

- ``kwatch.events``      the one event model (FileEvent, Op); pure.
- ``kwatch.paths``       relative paths as bytes: the safety check, is under / rebase / parent; pure.
- ``kwatch.libc``        the one typed ctypes binding of libc (syscalls Python lacks).
- ``kwatch.filesafety``  whether a file kwatch trusts (a config, an include, a password file) can be changed (or
                         read) by others.
- ``kwatch.capture``     backends that produce FileEvents: ``bpf`` (libbpf CO-RE via ctypes, ring buffer read by
                         mmap; the kernel side is ``bpf/kwatch.bpf.c``), ``fanotify``, ``inotify``; ``open_source``
                         picks one.
- ``kwatch.rules``       config parsing (changedfiles format and TOML) into one model; rule matching; pure.
- ``kwatch.actions``     the bounded, injection-safe shell action runner.
- ``kwatch.replicate``   the sending side: coalescer, planner, scanner, delta engine, and the transports that
                         drive the protocols.
- ``kwatch.mirror``      the mirror end (``kwatch agent``): the agent server and the confined receiver.
- ``kwatch.protocols``   sans-IO protocol state machines: the kwatch agent protocol and the rsync protocol.
- ``kwatch.outputs``     durable outputs of records (JSON-lines file, the systemd journal, NATS JetStream with an
                         on-disk spool) and ``kwatch collect``; alerts raised by rules go to every output.
- ``kwatch.metrics``     Prometheus collectors, read at scrape time from a registry passed in.
- ``kwatch.cli``         the command line (trace, run, replicate, agent, check-config, collect); wires the rest
                         together and is imported by nothing.
"""

__version__ = "0.1.0"
