"""Capture backends: turn kernel notifications into batches of :class:`kwatch.events.FileEvent`.

- ``base``      the Source interface and CaptureFilter.
- ``record``    the Python mirror of the kernel record in ``bpf/kwatch.h`` and its bulk decoder.
- ``libbpf``    a thin ctypes binding of Debian's libbpf.so.1.
- ``ringbuf``   a BPF ring buffer consumer that reads records straight from the mmap'ed map.
- ``bpf``       the BPF backend (tracepoints -> ring buffer).
- ``fanotify``  the fanotify backend (FAN_MARK_FILESYSTEM with names).
- ``inotify``   the unprivileged fallback (recursive watches).
- ``select``    ``open_source()``: BPF, else fanotify, else inotify, or the one asked for.
"""
