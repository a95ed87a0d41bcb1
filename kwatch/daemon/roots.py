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

from kwatch.events import normalize
from kwatch.rules.model import Config

_SPECIAL = set(".^$*+?{}[]|()\\")
# After a literal prefix, these allow only the end of a path component: the prefix is a whole directory name.
_COMPONENT_END = ("$", "\\Z", "(/|$)", "(?:/|$)", "($|/)", "(?:$|/)", "(/|\\Z)", "(?:/|\\Z)")


def _top_level_alternation(pattern: str) -> bool:
    depth = 0
    i = 0
    in_class = False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            if c == "]":
                in_class = False
        elif c == "[":
            in_class = True
            # a "]" right after "[" or "[^" is a literal member of the class
            if pattern[i + 1 : i + 2] == "]":
                i += 1
            elif pattern[i + 1 : i + 3] == "^]":
                i += 2
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            return True
        i += 1
    return False


def literal_prefix(pattern: str) -> tuple[str, str] | None:
    """(literal absolute prefix, rest of the regex) when ``pattern`` is anchored; else None."""
    if pattern.startswith("^"):
        i = 1
    elif pattern.startswith("\\A"):
        i = 2
    else:
        return None
    if _top_level_alternation(pattern):
        return None
    out: list[str] = []
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            nxt = pattern[i + 1 : i + 2]
            if not nxt or nxt.isalnum():  # \d, \w, \x41, back references: not a plain literal
                break
            lit, width = nxt, 2
        elif c in _SPECIAL:
            break
        else:
            lit, width = c, 1
        after = pattern[i + width : i + width + 1]
        if after in ("*", "?", "{"):  # optional or counted: the literal may be absent
            break
        out.append(lit)
        i += width
        if after == "+":  # at least one: the prefix holds with one, nothing after it is literal
            break
    prefix = "".join(out)
    if not prefix.startswith("/"):
        return None
    return prefix, pattern[i:]


def rule_root(pattern: str) -> bytes | None:
    """The directory every path ``pattern`` can match lies in, or None when it may match anywhere."""
    got = literal_prefix(pattern)
    if got is None:
        return None
    prefix, rest = got
    if rest.startswith(_COMPONENT_END):
        return normalize(prefix.encode("utf-8", "surrogateescape"))
    # the directory holding the last component of the prefix: "/a/b" -> "/a" (the regex may match "/a/bc"),
    # "/a/b/" -> "/a/b"
    root = prefix[: prefix.rfind("/")] or "/"
    return normalize(root.encode("utf-8", "surrogateescape"))


def existing_ancestor(path: bytes, exists: Callable[[bytes], bool]) -> bytes:
    """``path`` if it is an existing directory, else its nearest existing ancestor (``/`` at worst)."""
    while path != b"/" and not exists(path):
        path = os.path.dirname(path)
    return path


def wanted_roots(config: Config) -> tuple[bytes, ...] | None:
    """The trees the rules of ``config`` need (maybe not existing yet); None: the whole system.

    Rules without actions cannot start anything and are skipped; a config without any action needs nothing: ``()``.
    """
    roots: set[bytes] = set()
    for rs in config.rulesets:
        for rule in rs.rules:
            if not rule.actions:
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
