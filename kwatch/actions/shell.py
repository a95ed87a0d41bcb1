"""Placeholder compilation for action commands, and the exact argv/env an action runs with. Pure: no I/O.

The command text of an action is shell code written by the admin. File names are never pasted into it. Instead each
placeholder is replaced by a *reference* to an environment variable or to the positional parameters, written so that
it expands to exactly one word in the quoting context where the placeholder stood; the values travel in the
environment (as bytes) and in argv of ``/bin/sh -c SCRIPT kwatch FILE...``. A name such as ``$(reboot).jpg`` is then
data the shell expands, never text the shell parses, including inside backticks and ``$(...)`` that the admin wrote.

Placeholders (longest match first):

====================  ==========================  ===============================================================
placeholder           variable                    value
====================  ==========================  ===============================================================
``_FILE_``            ``KWATCH_FILE``             the path the rule matched (for rename/link: the new one if it
                                                  matched, else the old one)
``_OLD_FILE_``        ``KWATCH_OLD_FILE``         rename/link: the source path; other ops: the path
``_NEW_FILE_``        ``KWATCH_NEW_FILE``         rename/link: the destination path; other ops: empty
``_QFILE_`` etc.      ``KWATCH_QFILE`` etc.       the same value quoted for a POSIX shell (``'...'``); for commands
                                                  that hand their arguments to *another* shell, e.g. ``ssh host
                                                  rm -f /m/_QFILE_`` (ssh joins its arguments and the remote shell
                                                  parses them)
``_FILES_``           ``"$@"``                    every file of a batch, one argument each (a single action: the
                                                  one file); must stand as a whole, unquoted word
====================  ==========================  ===============================================================

How each context is rewritten (``V`` stands for the variable):

- unquoted: ``"${V}"`` (quoted, so no field splitting or globbing; adjacent text joins it: ``/m/otto"${V}"``)
- inside ``"..."``, an unquoted here-document body: ``${V}`` (already no splitting there)
- inside ``'...'``: ``'"${V}"'`` (close the single quotes, insert the quoted reference, reopen)
- inside ``$(...)`` and backticks: the inner text is compiled as a command of its own (backticks: after undoing
  and then redoing their backslash escapes, so nested backticks work too). An *unquoted* substitution whose command
  uses a placeholder is itself wrapped in double quotes: its output is derived from the name (```dirname _FILE_```)
  and must stay one word too. Command substitution still drops trailing newlines of its output, as it always does.
- inside ``${...}``: like the context around it
- a backslash before the leading ``_`` (``\\_FILE_``) keeps the text literal: a way to write ``_FILE_`` itself.

Refused, with the offset and a reason (the config loaders turn these into config errors with file and line):
placeholders inside ``$((...))`` arithmetic (bash would evaluate a name like ``a[$(cmd)]`` as code), directly after
``$`` or as a parameter name (``$_FILE_``, ``${_FILE_}`` are shell variables; write ``\\$_FILE_`` for a literal ``$``),
inside a here-document with a quoted delimiter (nothing expands there), ``_FILES_`` anywhere but as an unquoted word,
and unterminated quotes or substitutions.

The worst a misjudged context could do is split a name into several words: the value itself is never parsed as
code, because it is only ever reached through a parameter expansion.

Known limits of the scanner (documented, not guessed around): a ``)`` that closes a ``case`` pattern inside
``$(...)`` ends the substitution early for the scanner (write ``(pattern)``, which POSIX allows); ``$"..."`` (bash
locale strings) is not special in ``/bin/sh`` and is treated as ``$`` then ``"..."``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

#: placeholder -> the environment variable carrying its value (``_FILES_`` uses the positional parameters instead).
PLACEHOLDER_VARS: dict[str, str] = {
    "_FILE_": "KWATCH_FILE",
    "_OLD_FILE_": "KWATCH_OLD_FILE",
    "_NEW_FILE_": "KWATCH_NEW_FILE",
    "_QFILE_": "KWATCH_QFILE",
    "_QOLD_FILE_": "KWATCH_QOLD_FILE",
    "_QNEW_FILE_": "KWATCH_QNEW_FILE",
}
FILES = "_FILES_"

# Alternatives are tried in order at one position, so FILES must come before FILE.
_PLACEHOLDER_RE = re.compile(r"_(?:FILES|FILE|OLD_FILE|NEW_FILE|QFILE|QOLD_FILE|QNEW_FILE)_")
_NAME_START = re.compile(r"[A-Za-z_]")
_WORD_BREAK = " \t\n;&|()<>"

#: $0 of every action shell: what ``ps`` shows and what error messages from sh start with.
ARG0 = b"kwatch"


class ShellSyntaxError(ValueError):
    """A command cannot be compiled; ``offset`` is the character index in the command text."""

    def __init__(self, offset: int, reason: str) -> None:
        super().__init__(reason)
        self.offset = offset
        self.reason = reason


@dataclass(frozen=True)
class CompiledCommand:
    """An admin's command with every placeholder turned into a variable reference."""

    source: str
    script: str
    placeholders: frozenset[str]  # which placeholders the source used

    @property
    def uses_files(self) -> bool:
        return FILES in self.placeholders

    @property
    def uses_single(self) -> bool:
        return any(p != FILES for p in self.placeholders)


# Quoting contexts the scanner can be in.
_TOP = "top"  # unquoted command text
_DQ = "dq"  # inside "..."
_HEREDOC = "heredoc"  # body of a here-document with an unquoted delimiter


class _Scanner:
    """One pass over a command text (or the inside of a substitution), producing the rewritten text."""

    def __init__(self, text: str, base: int, found: set[str]) -> None:
        self.text = text
        self.base = base  # offset of text[0] in the whole command, for error messages
        self.found = found
        self.pos = 0
        self.out: list[str] = []
        self.heredocs: list[tuple[str, bool, bool]] = []  # (delimiter, quoted, strip tabs) awaiting a newline

    def error(self, at: int, reason: str) -> ShellSyntaxError:
        return ShellSyntaxError(self.base + at, reason)

    def at_word_start(self) -> bool:
        if not self.out:
            return True
        last = self.out[-1]
        return not last or last[-1] in _WORD_BREAK

    # -- placeholders -------------------------------------------------------------------------------------------

    def placeholder(self, ctx: str) -> bool:
        """If a placeholder starts at pos, emit its replacement for ``ctx`` and return True."""
        m = _PLACEHOLDER_RE.match(self.text, self.pos)
        if m is None:
            return False
        name = m.group(0)
        start, end = m.start(), m.end()
        self.found.add(name)
        if name == FILES:
            nxt = self.text[end] if end < len(self.text) else ""
            whole_word = self.at_word_start() and (nxt == "" or nxt in _WORD_BREAK)
            if ctx != _TOP or not whole_word:
                raise self.error(start, '_FILES_ must stand as a separate, unquoted word (it becomes "$@")')
            self.out.append('"$@"')
        else:
            var = PLACEHOLDER_VARS[name]
            if ctx == _TOP:
                self.out.append(f'"${{{var}}}"')
            else:
                self.out.append(f"${{{var}}}")
        self.pos = end
        return True

    # -- contexts -----------------------------------------------------------------------------------------------

    def run(self, ctx: str, closer: str | None = None) -> str:
        """Scan in ``ctx`` up to and including ``closer`` (or the closing ``"`` in _DQ), or to the end of the text."""
        text = self.text
        depth = 0  # unquoted parentheses opened inside a $(...) body
        while self.pos < len(text):
            c = text[self.pos]
            if ctx == _TOP and closer == ")" and c == ")" and depth == 0:
                self.pos += 1
                return "".join(self.out)
            if ctx == _TOP and closer == "}" and c == "}":
                self.pos += 1
                return "".join(self.out)
            if ctx == _DQ and c == '"':
                self.pos += 1
                return "".join(self.out)
            if c == "_" and self.placeholder(ctx):
                continue
            if c == "\\":
                self.out.append(text[self.pos : self.pos + 2])
                self.pos += 2
                continue
            if c == "$":
                self.dollar(ctx)
                continue
            if c == "`":
                self.backtick(ctx)
                continue
            if ctx == _TOP:
                if c == "'":
                    self.single_quote()
                    continue
                if c == '"':
                    self.out.append('"' + self.sub(self.pos + 1, _DQ, None) + '"')
                    continue
                if c == "#" and self.at_word_start():
                    end = text.find("\n", self.pos)
                    end = len(text) if end < 0 else end
                    self.out.append(text[self.pos : end])
                    self.pos = end
                    continue
                if c == "<" and text.startswith("<<", self.pos) and not text.startswith("<<<", self.pos):
                    self.heredoc_operator()
                    continue
                if c == "\n" and self.heredocs:
                    self.out.append("\n")
                    self.pos += 1
                    self.heredoc_bodies()
                    continue
                if closer == ")":
                    if c == "(":
                        depth += 1
                    elif c == ")":
                        depth -= 1
            self.out.append(c)
            self.pos += 1
        if ctx == _DQ:
            raise self.error(self.pos, "unterminated double quote")
        if closer is not None:
            raise self.error(self.pos, f"unterminated substitution: missing '{closer}'")
        if self.heredocs:
            raise self.error(self.pos, f"here-document delimited by {self.heredocs[0][0]!r} has no body")
        return "".join(self.out)

    def single_quote(self) -> None:
        text = self.text
        start = self.pos
        end = text.find("'", start + 1)
        if end < 0:
            raise self.error(start, "unterminated single quote")
        body = text[start + 1 : end]
        parts = ["'"]
        i = 0
        while i < len(body):
            m = _PLACEHOLDER_RE.search(body, i)
            if m is None:
                parts.append(body[i:])
                break
            parts.append(body[i : m.start()])
            name = m.group(0)
            if name == FILES:
                raise self.error(
                    start + 1 + m.start(), '_FILES_ must stand as a separate, unquoted word (it becomes "$@")'
                )
            self.found.add(name)
            parts.append(f"'\"${{{PLACEHOLDER_VARS[name]}}}\"'")
            i = m.end()
        parts.append("'")
        self.out.append("".join(parts))
        self.pos = end + 1

    def sub(self, start: int, ctx: str, closer: str | None) -> str:
        """Compile text[start:] in ``ctx`` up to ``closer``; advance pos past it; return the rewritten inside."""
        inner = _Scanner(self.text, self.base, self.found)
        inner.pos = start
        body = inner.run(ctx, closer)
        self.pos = inner.pos
        return body

    def dollar(self, ctx: str) -> None:
        text = self.text
        p = self.pos
        if text.startswith("$((", p):
            end = self.arith_end(p + 3)
            body = text[p + 3 : end]
            m = _PLACEHOLDER_RE.search(body)
            if m is not None:
                raise self.error(
                    p + 3 + m.start(),
                    f"{m.group(0)} inside $((...)) arithmetic is refused (its value would be evaluated)",
                )
            self.out.append(text[p : end + 2])
            self.pos = end + 2
            return
        if text.startswith("$(", p):
            inner = _Scanner(text, self.base, set())
            inner.pos = p + 2
            body = inner.run(_TOP, ")")
            self.pos = inner.pos
            self.found.update(inner.found)
            self.out.append(_quote_derived(f"$({body})", ctx, inner.found))
            return
        if text.startswith("${", p):
            if _PLACEHOLDER_RE.match(text, p + 2):
                raise self.error(
                    p + 2, "a placeholder cannot be a parameter name (${_FILE_} is a shell variable)"
                )
            # The word inside ${name:-word} is expanded in the context around it.
            body = self.sub(p + 2, _TOP, "}") if ctx == _TOP else self.param_in_dq(p + 2)
            self.out.append("${" + body + "}")
            return
        m = _PLACEHOLDER_RE.match(text, p + 1)
        if m is not None:
            raise self.error(
                p + 1,
                f"{m.group(0)} directly after '$' reads as a shell variable; write \\${m.group(0)} for a literal '$'",
            )
        self.out.append("$")
        self.pos = p + 1

    def param_in_dq(self, start: int) -> str:
        # Inside "...${x:-word}...", the word is double-quote context and ends at the first unescaped '}'.
        inner = _Scanner(self.text, self.base, self.found)
        inner.pos = start
        text = self.text
        while inner.pos < len(text):
            c = text[inner.pos]
            if c == "}":
                self.pos = inner.pos + 1
                return "".join(inner.out)
            if c == "_" and inner.placeholder(_DQ):
                continue
            if c == "\\":
                inner.out.append(text[inner.pos : inner.pos + 2])
                inner.pos += 2
                continue
            if c == "$":
                inner.dollar(_DQ)
                continue
            if c == "`":
                inner.backtick(_DQ)
                continue
            if c == '"':
                # Nested quotes inside ${...} within "...": dash and bash both open a fresh quoted string.
                inner.out.append('"' + inner.sub(inner.pos + 1, _DQ, None) + '"')
                continue
            inner.out.append(c)
            inner.pos += 1
        raise self.error(len(text), "unterminated substitution: missing '}'")

    def arith_end(self, start: int) -> int:
        depth = 0
        text = self.text
        i = start
        while i < len(text):
            if text.startswith("))", i) and depth == 0:
                return i
            if text[i] == "(":
                depth += 1
            elif text[i] == ")":
                depth -= 1
            i += 1
        raise self.error(start - 3, "unterminated $((...))")

    def backtick(self, ctx: str) -> None:
        text = self.text
        start = self.pos
        i = start + 1
        raw: list[str] = []
        while True:
            if i >= len(text):
                raise self.error(start, "unterminated backtick substitution")
            c = text[i]
            if c == "\\" and i + 1 < len(text):
                nxt = text[i + 1]
                # Inside backticks a backslash escapes only $ ` \ (and " when the backticks are inside "..."):
                # those lose the backslash before the inner command is parsed; others keep it.
                if nxt in "$`\\" or (nxt == '"' and ctx != _TOP):
                    raw.append(nxt)
                else:
                    raw.append(c + nxt)
                i += 2
                continue
            if c == "`":
                break
            raw.append(c)
            i += 1
        inner_text = "".join(raw)
        try:
            inner = compile_command(inner_text)
        except ShellSyntaxError as e:
            raise self.error(start + 1, f"inside backticks: {e.reason}") from None
        self.found.update(inner.placeholders)
        # Redo the escapes so that the shell's unescaping gives back exactly the compiled inner text.
        # A plain "$" needs no escape: the shell keeps it and the inner parse expands it.
        escaped = inner.script.replace("\\", "\\\\").replace("`", "\\`")
        self.out.append(_quote_derived(f"`{escaped}`", ctx, inner.placeholders))
        self.pos = i + 1

    # -- here-documents ------------------------------------------------------------------------------------------

    def heredoc_operator(self) -> None:
        text = self.text
        p = self.pos + 2
        strip = text.startswith("-", p)
        if strip:
            p += 1
        op_end = p
        while p < len(text) and text[p] in " \t":
            p += 1
        word_start = p
        while p < len(text) and text[p] not in _WORD_BREAK:
            if text[p] == "\\":
                p += 2
                continue
            if text[p] in "'\"":
                close = text.find(text[p], p + 1)
                if close < 0:
                    raise self.error(p, "unterminated quote in here-document delimiter")
                p = close + 1
                continue
            p += 1
        word = text[word_start:p]
        if not word:
            raise self.error(self.pos, "'<<' without a here-document delimiter")
        quoted = any(q in word for q in "'\"\\")
        delim = word.replace("\\", "").replace("'", "").replace('"', "")
        self.heredocs.append((delim, quoted, strip))
        self.out.append(text[self.pos : op_end] + text[op_end:p])
        self.pos = p

    def heredoc_bodies(self) -> None:
        text = self.text
        for delim, quoted, strip in self.heredocs:
            while True:
                if self.pos >= len(text):
                    raise self.error(self.pos, f"here-document delimited by {delim!r} is not terminated")
                end = text.find("\n", self.pos)
                end = len(text) if end < 0 else end
                line = text[self.pos : end]
                check = line.lstrip("\t") if strip else line
                if check == delim:
                    self.out.append(text[self.pos : end + 1])
                    self.pos = end + 1
                    break
                if quoted:
                    m = _PLACEHOLDER_RE.search(line)
                    if m is not None:
                        raise self.error(
                            self.pos + m.start(),
                            f"{m.group(0)} inside a here-document with a quoted delimiter is never expanded; "
                            "unquote the delimiter",
                        )
                    self.out.append(text[self.pos : end + 1])
                    self.pos = end + 1
                    continue
                self.out.append(self.heredoc_line(self.pos, end))
                if end < len(text):
                    self.out.append("\n")
                self.pos = end + 1
        self.heredocs = []

    def heredoc_line(self, start: int, end: int) -> str:
        inner = _Scanner(self.text[:end], self.base, self.found)
        inner.pos = start
        text = inner.text
        while inner.pos < end:
            c = text[inner.pos]
            if c == "_" and inner.placeholder(_HEREDOC):
                continue
            if c == "\\":
                inner.out.append(text[inner.pos : inner.pos + 2])
                inner.pos += 2
                continue
            if c == "$":
                inner.dollar(_HEREDOC)
                continue
            if c == "`":
                inner.backtick(_HEREDOC)
                continue
            inner.out.append(c)
            inner.pos += 1
        return "".join(inner.out)


def _quote_derived(subst: str, ctx: str, used: Iterable[str]) -> str:
    """Quote an unquoted command substitution whose command used a placeholder.

    Its output is derived from a file name (```dirname _FILE_```), so left unquoted it would be split at spaces and
    globbed; quoted, it stays one word. Inside backticks the escapes mean the same within double quotes, except
    that ``\\"`` also loses its backslash there; the rewritten body doubles every backslash, so it holds no such
    pair and needs no change. A substitution that only uses ``_FILES_`` is left as written: its output is a list on
    purpose.
    """
    if ctx == _TOP and any(p != FILES for p in used):
        return f'"{subst}"'
    return subst


def compile_command(text: str) -> CompiledCommand:
    """Rewrite ``text`` so that placeholders become variable references; raise ShellSyntaxError if impossible."""
    found: set[str] = set()
    scanner = _Scanner(text, 0, found)
    script = scanner.run(_TOP)
    return CompiledCommand(text, script, frozenset(found))


def shell_quote(value: bytes) -> bytes:
    """``value`` as one word for a POSIX shell: single quotes, each ``'`` written as ``'\\''``."""
    return b"'" + value.replace(b"'", b"'\\''") + b"'"


def placeholder_env(
    file: bytes, old_file: bytes, new_file: bytes, op: str, pid: int | None
) -> dict[bytes, bytes]:
    """The KWATCH_* variables of one action run. Every key is always set (empty when not applicable) so that a
    stale value inherited from the daemon's own environment can never leak into a command."""
    return {
        b"KWATCH_FILE": file,
        b"KWATCH_OLD_FILE": old_file,
        b"KWATCH_NEW_FILE": new_file,
        b"KWATCH_QFILE": shell_quote(file),
        b"KWATCH_QOLD_FILE": shell_quote(old_file),
        b"KWATCH_QNEW_FILE": shell_quote(new_file),
        b"KWATCH_OP": op.encode(),
        b"KWATCH_PID": b"" if pid is None else str(pid).encode(),
    }


@dataclass(frozen=True)
class ExecSpec:
    """Exactly what one action run executes: what ``--dry-run`` prints and what the runner passes to the kernel."""

    argv: tuple[bytes, ...]
    env: Mapping[bytes, bytes]
    stdin: bytes | None = None  # batch "stdin" mode: NUL-terminated paths; None: /dev/null
    files: tuple[bytes, ...] = ()


def exec_spec(
    compiled: CompiledCommand,
    base_env: Mapping[bytes, bytes],
    kw_env: Mapping[bytes, bytes],
    args: Sequence[bytes] = (),
    stdin: bytes | None = None,
    shell: bytes = b"/bin/sh",
    files: Sequence[bytes] = (),
) -> ExecSpec:
    """argv ``[shell, -c, script, kwatch, *args]`` and env ``base_env`` overlaid with ``kw_env``."""
    env = {k: v for k, v in base_env.items() if not k.startswith(b"KWATCH_")}
    env.update(kw_env)
    argv = (shell, b"-c", compiled.script.encode("utf-8", "surrogateescape"), ARG0, *args)
    return ExecSpec(argv, env, stdin, tuple(files))


def env_size(env: Mapping[bytes, bytes]) -> int:
    """Bytes the kernel counts against ARG_MAX for an environment: each ``K=V\\0`` plus its pointer."""
    return sum(len(k) + len(v) + 2 + 8 for k, v in env.items())


def chunk_args(
    files: Iterable[bytes], fixed: Sequence[bytes], env: Mapping[bytes, bytes], arg_max: int
) -> list[list[bytes]]:
    """Split ``files`` into argument lists so that fixed argv + files + env stays under ``arg_max``.

    Linux (fs/exec.c) counts each argv and envp string with its NUL, plus one pointer each, against the limit of
    ``sysconf(_SC_ARG_MAX)`` (a quarter of the stack rlimit). 4 KiB are kept free as POSIX suggests (2048) and for
    the auxiliary vector. A single path is at most PATH_MAX (4096), far under MAX_ARG_STRLEN (128 KiB), so every
    file fits in some chunk as long as the limit leaves room for one.
    """
    budget = arg_max - 4096 - env_size(env) - sum(len(a) + 1 + 8 for a in fixed)
    chunks: list[list[bytes]] = []
    cur: list[bytes] = []
    used = 0
    for f in files:
        need = len(f) + 1 + 8
        if need > budget:
            raise ValueError(f"argument limit {arg_max} leaves no room for a path of {len(f)} bytes")
        if cur and used + need > budget:
            chunks.append(cur)
            cur, used = [], 0
        cur.append(f)
        used += need
    if cur:
        chunks.append(cur)
    return chunks


def nul_list(files: Iterable[bytes]) -> bytes:
    """Paths for a batch read from stdin: each followed by a NUL (``xargs -0``, ``tar --null -T -``)."""
    return b"".join(f + b"\0" for f in files)
