"""Durable outputs: where ``kwatch run`` and ``kwatch trace`` write their records so they survive restarts and reach
a central place.

- ``record``   the record (the JSON object of ``kwatch trace --json`` plus time, host and kind) and its JSON line:
               events, alerts raised by rules, and loss markers. Pure.
- ``config``   the ``[[output]]`` TOML tables and the ``--output`` option strings, checked into OutputSpec. Pure.
- ``jsonl``    JSON lines to a file: whole lines only, rotation by size and count, fsync policy, repair of a torn
               last line after a crash. The naming and repair rules are pure functions; ``JsonlWriter`` does I/O.
- ``journal``  the systemd journal over its native datagram protocol (memfd for big entries). ``encode_entry`` is
               pure; ``JournalWriter`` does I/O.
- ``spool``    a bounded on-disk FIFO of NATS messages, kept across restarts.
- ``fleet``    the fleet bus wire format: subjects, message ids, batch framing. Pure.
- ``bus``      the NATS JetStream publisher: its own thread and asyncio loop fed by a bounded queue, the spool in
               front of the server, duplicates dropped by message id.
- ``collect``  ``kwatch collect``: a durable JetStream consumer that prints or archives the merged records of a fleet.
- ``sink``     the fan-out: records built once per batch and written to every output; the daemon's event sink and
               ``kwatch trace``'s.

Nothing here is imported by capture, rules or replication; the CLI and the daemon wire it in.
"""
