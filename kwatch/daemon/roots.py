"""Which trees the daemon captures: the directories a config's rules can possibly match. Pure except for the
``exists`` check the caller passes (``os.path.isdir`` in the daemon).

A rule regex is *anchored* when it starts with ``^`` (or ``\\A``), has no top-level ``|``, and continues with a
literal absolute path: ``^/export/home/image-converter.*\\.jpg$`` can only match paths that start with
``/export/home/image-converter``. The tree to watch is the directory holding that literal prefix (``/export/home``;
``^/srv/in/`` -> ``/srv/in``), or the prefix itself when the regex allows nothing but the end of a path component
after it (``^/tmp/kwatch-demo(/|$)`` -> ``/tmp/kwatch-demo``): the directory itself is then inside the watched tree
(``CaptureFilter.accepts`` takes a root's own path, and the BPF backend passes events named in the directories above
a root to userspace). A literal made optional by a quantifier (``^/dat?a``) is not part of the prefix.

One unanchored rule (``\\.jpg$``) means the whole system: roots ``()``. A root that does not exist yet is replaced by
its nearest existing ancestor (nothing is created); the daemon re-checks from time to time and narrows the watch once
the directory appears. Only the rules decide here; event sinks (replication) may add roots of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

from kwatch.rules.model import Config
from kwatch.rules.prefix import rule_root

__all__ = ["capture_roots", "existing_ancestor", "minimal", "wanted_roots"]

def existing_ancestor(path: bytes, exists: Callable[[bytes], bool]) -> bytes:
    """``path`` if it is an existing directory, else its nearest existing ancestor (``/`` at worst)."""
    while path != b"/" and not exists(path):
        path = os.path.dirname(path)
    return path


def wanted_roots(config: Config) -> tuple[bytes, ...] | None:
    """The trees the rules of ``config`` need (maybe not existing yet); None: the whole system.

    Rules without actions or alerts cannot start anything and are skipped; a config without any needs nothing: ``()``.
    """
    roots: set[bytes] = set()
    for rs in config.rulesets:
        for rule in rs.rules:
            if not rule.actions and not rule.alerts:
                continue
            root = rule_root(rule.pattern)
            if root is None:
                return None
            roots.add(root)
    return tuple(sorted(roots))


def minimal(roots: Iterable[bytes]) -> tuple[bytes, ...]:
    """Drop every root that lies inside another one."""
    out: list[bytes] = []
    for r in sorted(set(roots)):
        if not any(r == o or r.startswith(o.rstrip(b"/") + b"/") for o in out):
            out.append(r)
    return tuple(out)


def capture_roots(wanted: Iterable[bytes], exists: Callable[[bytes], bool]) -> tuple[bytes, ...]:
    """Existing directories to watch for ``wanted`` roots: each one or its nearest existing ancestor.

    ``()`` means the whole system; a result holding ``/`` is returned as ``()`` too.
    """
    got = minimal(existing_ancestor(r, exists) for r in wanted)
    return () if b"/" in got else got
