"""Which directory a rule regex is confined to, from its literal anchored prefix. Pure.

A rule regex is *anchored* when it starts with ``^`` (or ``\\A``), has no top-level ``|``, and continues with a
literal absolute path: ``^/export/home/image-converter.*\\.jpg$`` can only match paths that start with
``/export/home/image-converter``, so it is confined to ``/export/home``; ``^/tmp/kwatch-demo(/|$)`` and
``^/srv/in/`` name a whole directory (``/tmp/kwatch-demo``, ``/srv/in``). The daemon watches these trees
(:mod:`kwatch.daemon.roots`); a REPLICATE action replicates the directory its rule names (:func:`rule_directory`).
"""

from __future__ import annotations

from kwatch.events import normalize

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




def rule_directory(pattern: str) -> bytes | None:
    """The directory ``pattern`` names as a whole (``^/srv/data(/|$)``, ``^/srv/data/``, ``^/srv/data$``), or None."""
    got = literal_prefix(pattern)
    if got is None:
        return None
    prefix, rest = got
    if rest.startswith(_COMPONENT_END) or (prefix.endswith("/") and len(prefix) > 1):
        return normalize(prefix.encode("utf-8", "surrogateescape"))
    return None
