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

- placeholders where bash evaluates a value as arithmetic or as a variable name, because there a name such as
  ``a[$(cmd)]`` runs ``cmd`` (its subscript is evaluated): ``(( ))`` and ``for (( ))``, ``$(( ))``, ``$[ ]``,
  arguments of ``let``, ``declare``/``typeset``/``local``, ``read``, ``unset``, ``mapfile``/``readarray``, the
  name after ``printf -v``, a ``[[ ]]`` that uses ``-eq -ne -lt -le -gt -ge -v -R``, ``test``/``[`` with ``-v``/
  ``-R``, array subscripts (``a[_FILE_]=``, ``${a[_FILE_]}``, ``a=([_FILE_]=x)``), the offset and length of
  ``${x:offset:length}``, and anywhere in a command that gives a variable the integer or nameref attribute
  (``declare -i``, ``local -n``...). A placeholder inside a command substitution in those places counts too: its
  output is derived from the name. dash evaluates none of these, but the same config may run under bash. Write
  the name into a variable first (``f=_FILE_``) and keep the arithmetic on numbers the command computes
  (``n=$(stat -c %s _FILE_); echo $((n + 1))`` is accepted);
- placeholders directly after ``$`` or as a parameter name (``$_FILE_``, ``${_FILE_}``, ``${#_FILE_}`` are shell
  variables; write ``\\$_FILE_`` for a literal ``$``);
- placeholders inside a here-document with a quoted delimiter (nothing expands there);
- ``_FILES_`` anywhere but as an unquoted word; unterminated quotes or substitutions.

To know where those places are, the scanner follows the shell's grammar at the level of commands: words, the
command name (after assignments and ``command``/``builtin``/``exec``), redirection targets, ``case`` patterns
(whose ``)`` does not close a ``$(...)``), ``[[ ]]``, comments (a ``#`` only where a word starts: not after
``$(...)`` or in ``${#x}``) and here-documents.

The worst a misjudged context could do is split a name into several words: the value itself is never parsed as
code, because it is only ever reached through a parameter expansion, except where bash evaluates it (above).

Known limits of the scanner (documented, not guessed around): it follows placeholders, not variables, so
``f=_FILE_; echo $((f))`` is the admin's own arithmetic on a name; commands that hand their arguments to another
shell (``ssh``, ``eval``, ``sh -c``) get a warning, and want ``_QFILE_``; ``$"..."`` (bash locale strings) is not
special in ``/bin/sh`` and is treated as ``$`` then ``"..."``; aliases and functions named like the builtins above
are not told apart from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

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
_TOP = "top"  # unquoted command text (commands, words, redirections)
_PARAM = "param"  # the word of an unquoted ${name:-word}: quoting as at the top, but no commands or comments
_DQ = "dq"  # inside "..."
_PARAM_DQ = "param-dq"  # the word of a ${name:-word} inside "...": double-quote context up to the '}'
_HEREDOC = "heredoc"  # body of a here-document with an unquoted delimiter

# Reserved words after which the next word is a command again.
_LEADING_RESERVED = frozenset({"if", "then", "else", "elif", "do", "while", "until", "{", "!", "time"})
# Words that run the next word as the command.
_PREFIX_COMMANDS = frozenset({"command", "builtin", "exec", "nohup"})
# bash builtins whose arguments are evaluated as arithmetic or read as variable names (whose subscripts are
# arithmetic): a placeholder there hands the name to bash's evaluator.
_EVALUATING = {
    "let": "let evaluates its arguments as arithmetic",
    "declare": "declare reads its arguments as variable names (with arithmetic subscripts) or integer values",
    "typeset": "typeset reads its arguments as variable names (with arithmetic subscripts) or integer values",
    "local": "local reads its arguments as variable names (with arithmetic subscripts) or integer values",
    "read": "read takes variable names (with arithmetic subscripts)",
    "unset": "unset takes variable names (with arithmetic subscripts)",
    "mapfile": "mapfile takes a variable name (with an arithmetic subscript)",
    "readarray": "readarray takes a variable name (with an arithmetic subscript)",
}
# Operators of [[ ]] whose operands bash evaluates as arithmetic (-eq ...) or as variable names (-v, -R).
_COND_OP_RE = re.compile(r"(?<![^\s(!])-(?:eq|ne|lt|le|gt|ge|v|R)(?![^\s)])")
_NAME_TEST_OPS = frozenset({"-v", "-R"})  # test/[ compare numbers as integers; only these name a variable there
_COND_END_RE = re.compile(r"(?<=\s)\]\](?=[\s;&|)]|\Z)")
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\+?=")
_SUBSCRIPT_START = re.compile(r"(?:[A-Za-z_][A-Za-z0-9_]*)?\[")
_PARAM_NAME = re.compile(r"[#!]?(?:[A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#?$!-])")
_ATTR_OPTION = re.compile(r"[-+][A-Za-z]*[in][A-Za-z]*")

_ARITH_WHY = "bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"


@dataclass
class _Word:
    """A word of the command being scanned: where it starts, the placeholders in it, its literal text."""

    start: int
    hit0: int  # the word holds hits[hit0:hit1]
    hit1: int = -1  # set when the word ends
    literal: str = ""  # the plain text the word starts with (all of it while ``pure``): ``x=`` of ``x="$y"``
    pure: bool = True  # the whole word so far is plain text: it can be a command name or a keyword
    redirect: bool = False  # the target of a redirection (< > >> ...), not an argument


@dataclass
class _Shared:
    """State of one compilation shared by the scanners of its substitutions."""

    hits: list[int] = field(default_factory=list)  # offsets of every placeholder (a backtick's: its start)
    attributes_at: int | None = None  # where declare/typeset/local gives a variable the integer or nameref attribute


def _refuse_in(text: str, base: int, start: int, end: int, what: str, why: str = _ARITH_WHY) -> None:
    """Refuse a placeholder anywhere in text[start:end] (nested substitutions included); ``base``: the offset of
    text[0] in the whole command."""
    m = _PLACEHOLDER_RE.search(text, start, end)
    if m is not None:
        raise ShellSyntaxError(base + m.start(), f"{m.group(0)} inside {what} is refused: {why}")


def _bracket_end(text: str, start: int) -> int | None:
    """Offset of the ']' closing a '[' just before ``start`` (None: not closed on this line)."""
    depth = 0
    for i in range(start, len(text)):
        c = text[i]
        if c == "\n":
            return None
        if c == "[":
            depth += 1
        elif c == "]":
            if depth == 0:
                return i
            depth -= 1
    return None


def _arith_command_end(text: str, start: int) -> int | None:
    """Offset of the '))' closing an arithmetic expression that starts at ``start``, None if there is none."""
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("))", i) and depth == 0:
            return i
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth < 0:
                return None  # '((a) ...)': two subshells, not arithmetic
        i += 1
    return None


def _backtick_command(text: str, start: int, ctx: str, base: int) -> tuple[str, int]:
    """The command of the backtick substitution at ``start`` as the shell parses it, and the offset of the closing
    backtick. Inside backticks a backslash escapes only $ ` \\ (and " when the backticks are inside "..."): those
    lose the backslash before the inner command is parsed; others keep it."""
    i = start + 1
    raw: list[str] = []
    while True:
        if i >= len(text):
            raise ShellSyntaxError(base + start, "unterminated backtick substitution")
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt in "$`\\" or (nxt == '"' and ctx not in (_TOP, _PARAM)):
                raw.append(nxt)
            else:
                raw.append(c + nxt)
            i += 2
            continue
        if c == "`":
            return "".join(raw), i
        raw.append(c)
        i += 1


def _single_quoted(text: str, start: int, base: int, found: set[str], hits: list[int]) -> tuple[str, int]:
    """The single-quoted string at ``start`` rewritten (each placeholder closes the quote for its variable, in
    double quotes), and the offset after it; the placeholders go into ``found`` and ``hits``."""
    end = text.find("'", start + 1)
    if end < 0:
        raise ShellSyntaxError(base + start, "unterminated single quote")
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
            raise ShellSyntaxError(
                base + start + 1 + m.start(), '_FILES_ must stand as a separate, unquoted word (it becomes "$@")'
            )
        found.add(name)
        hits.append(base + start + 1 + m.start())
        parts.append(f"'\"${{{PLACEHOLDER_VARS[name]}}}\"'")
        i = m.end()
    parts.append("'")
    return "".join(parts), end + 1


def _heredoc_operator(text: str, pos: int, base: int) -> tuple[str, bool, bool, int]:
    """The here-document operator (``<<`` or ``<<-``) at ``pos`` and its delimiter word: (delimiter, quoted,
    strip tabs, offset after the word)."""
    p = pos + 2
    strip = text.startswith("-", p)
    if strip:
        p += 1
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
                raise ShellSyntaxError(base + p, "unterminated quote in here-document delimiter")
            p = close + 1
            continue
        p += 1
    word = text[word_start:p]
    if not word:
        raise ShellSyntaxError(base + pos, "'<<' without a here-document delimiter")
    quoted = any(q in word for q in "'\"\\")
    return word.replace("\\", "").replace("'", "").replace('"', ""), quoted, strip, p


class _Command:
    """The shell grammar of the simple command being scanned (context _TOP): its words, which one is the command
    name, and whether the scan is in a ``case`` pattern or a ``[[ ]]`` test, far enough to refuse a placeholder
    where bash would evaluate it as code (see the module docstring)."""

    def __init__(self, text: str, base: int, shared: _Shared) -> None:
        self.text = text
        self.base = base
        self.shared = shared
        self.word: _Word | None = None  # the word being read
        self.words: list[_Word] = []  # the words of the current simple command
        self.redirect_next = False
        self.cond_end = -1  # inside [[ ... ]] up to this offset: ( ) < > & | are operands, not syntax
        self.case: list[str] = []  # per open case: "subject", "in", "pattern" or "body"

    def after_for(self) -> bool:
        return len(self.words) == 1 and self.words[0].pure and self.words[0].literal == "for"

    def begin_word(self, pos: int) -> _Word:
        if self.word is None:
            if self.cond_end < 0 and not self.in_pattern() and all(_ASSIGNMENT.match(w.literal) for w in self.words):
                self.check_subscript_assignment(pos)
            self.word = _Word(pos, len(self.shared.hits), redirect=self.redirect_next)
            self.redirect_next = False
        return self.word

    def impure(self, pos: int) -> None:
        self.begin_word(pos).pure = False

    def in_pattern(self) -> bool:
        return bool(self.case) and self.case[-1] in ("subject", "in", "pattern")

    def command_position(self) -> bool:
        return not self.words and not self.in_pattern()

    def end_word(self, pos: int) -> None:
        w = self.word
        if w is None:
            return
        self.word = None
        w.hit1 = len(self.shared.hits)
        word = w.literal if w.pure else None
        if self.case:
            state = self.case[-1]
            if state == "subject":
                self.case[-1] = "in"
                return
            if state == "in":
                self.case[-1] = "pattern" if word == "in" else "in"
                return
            if state == "pattern":
                if word == "esac":
                    self.case.pop()
                return
            if word == "esac" and not self.words:
                self.case.pop()
                return
        if not self.words and word is not None:
            if word == "case":
                self.case.append("subject")
                return
            if word in _LEADING_RESERVED:
                return
            if word == "[[":
                m = _COND_END_RE.search(self.text, pos)
                end = m.end() if m is not None else len(self.text)
                if _COND_OP_RE.search(self.text, pos, end) is not None:
                    _refuse_in(
                        self.text,
                        self.base,
                        pos,
                        end,
                        "a [[ ]] test with -eq/-ne/-lt/-le/-gt/-ge/-v/-R",
                        "bash evaluates those operands as arithmetic or variable names, so a name like "
                        "a[$(cmd)] would run cmd; compare the file name in a [[ ]] of its own",
                    )
                self.cond_end = end
        self.words.append(w)

    def end_command(self, pos: int) -> None:
        self.end_word(pos)
        words, self.words = self.words, []
        self.redirect_next = False
        if pos >= self.cond_end:
            self.cond_end = -1
        args = [w for w in words if not w.redirect]
        i = 0
        while i < len(args) and _ASSIGNMENT.match(args[i].literal):
            i += 1
        while i < len(args) and args[i].pure and args[i].literal in _PREFIX_COMMANDS:
            i += 1
        if i >= len(args) or not args[i].pure:
            return
        name, rest = args[i].literal, args[i + 1 :]
        hits = self.shared.hits

        def first_hit(ws: list[_Word]) -> int | None:
            for w in ws:
                if w.hit1 > w.hit0:
                    return hits[w.hit0]
            return None

        attribute = any(w.pure and _ATTR_OPTION.fullmatch(w.literal) for w in rest)
        if name in ("declare", "typeset", "local") and attribute and self.shared.attributes_at is None:
            self.shared.attributes_at = self.base + args[i].start
        if name in _EVALUATING:
            at = first_hit(rest)
            if at is not None:
                raise ShellSyntaxError(
                    at, f"a placeholder in the arguments of {name} is refused: {_EVALUATING[name]}, so a name "
                    "like a[$(cmd)] would run cmd; assign it to a variable first (f=_FILE_)"
                )
        if name in ("test", "[") and any(w.pure and w.literal in _NAME_TEST_OPS for w in rest):
            at = first_hit(rest)
            if at is not None:
                raise ShellSyntaxError(
                    at, f"a placeholder in a {name} with -v/-R is refused: bash reads that operand as a variable "
                    "name, so a name like a[$(cmd)] would run cmd"
                )
        if name == "printf":
            for k, w in enumerate(rest[:-1]):
                if w.pure and w.literal == "-v":
                    at = first_hit([rest[k + 1]])
                    if at is not None:
                        raise ShellSyntaxError(
                            at, "a placeholder after printf -v is refused: it names a variable (with an arithmetic "
                            "subscript), so a name like a[$(cmd)] would run cmd"
                        )

    def check_subscript_assignment(self, pos: int) -> None:
        """``name[subscript]=value`` (and ``[subscript]=value`` in ``name=(...)``): bash evaluates the subscript."""
        m = _SUBSCRIPT_START.match(self.text, pos)
        if m is None:
            return
        end = _bracket_end(self.text, m.end())
        if end is not None and self.text.startswith(("]=", "]+="), end):
            _refuse_in(self.text, self.base, m.end(), end, "an array subscript")


class _Scanner:
    """One pass over a command text (or the inside of a substitution), producing the rewritten text.

    In command context it also follows the shell's grammar far enough to know where a command starts, which word
    is its name, and where ``case`` patterns, ``[[ ]]`` tests and ``(( ))`` arithmetic are: bash evaluates a value
    as code in arithmetic and in variable names, so a placeholder is refused there (see the module docstring).
    """

    def __init__(self, text: str, base: int, found: set[str], shared: _Shared | None = None) -> None:
        self.text = text
        self.base = base  # offset of text[0] in the whole command, for error messages
        self.found = found
        self.shared = shared if shared is not None else _Shared()
        self.pos = 0
        self.out: list[str] = []
        self.heredocs: list[tuple[str, bool, bool]] = []  # (delimiter, quoted, strip tabs) awaiting a newline
        self.depth = 0  # unquoted parentheses opened inside a $(...) body
        self.cmd = _Command(text, base, self.shared)  # context _TOP only

    def error(self, at: int, reason: str) -> ShellSyntaxError:
        return ShellSyntaxError(self.base + at, reason)

    def refuse_in(self, start: int, end: int, what: str, why: str = _ARITH_WHY) -> None:
        _refuse_in(self.text, self.base, start, end, what, why)

    # -- placeholders -------------------------------------------------------------------------------------------

    def placeholder(self, ctx: str) -> bool:
        """If a placeholder starts at pos, emit its replacement for ``ctx`` and return True."""
        m = _PLACEHOLDER_RE.match(self.text, self.pos)
        if m is None:
            return False
        name = m.group(0)
        start, end = m.start(), m.end()
        self.found.add(name)
        self.shared.hits.append(self.base + start)
        if name == FILES:
            nxt = self.text[end] if end < len(self.text) else ""
            whole_word = self.cmd.word is not None and self.cmd.word.start == start and (nxt == "" or nxt in _WORD_BREAK)
            if ctx != _TOP or not whole_word:
                raise self.error(start, '_FILES_ must stand as a separate, unquoted word (it becomes "$@")')
            self.out.append('"$@"')
        else:
            var = PLACEHOLDER_VARS[name]
            if ctx in (_TOP, _PARAM):
                self.out.append(f'"${{{var}}}"')
            else:
                self.out.append(f"${{{var}}}")
        self.pos = end
        return True

    # -- contexts -----------------------------------------------------------------------------------------------

    def run(self, ctx: str, closer: str | None = None) -> str:
        """Scan in ``ctx`` up to and including ``closer`` (the closing ``"`` in _DQ), or to the end of the text."""
        if ctx != _TOP:
            return self.run_word(ctx)
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            in_cond = self.pos < self.cmd.cond_end
            if self.cmd.case and self.cmd.case[-1] == "pattern" and not in_cond and self.case_pattern_char(c):
                continue
            if closer == ")" and c == ")" and self.depth == 0 and not in_cond:
                self.cmd.end_command(self.pos)
                self.pos += 1
                return "".join(self.out)
            if self.top_quote(c) or self.top_blank(c, in_cond) or (not in_cond and self.top_operator(c, closer)):
                continue
            w = self.cmd.begin_word(self.pos)
            if w.pure:
                w.literal += c
            self.out.append(c)
            self.pos += 1
        if closer is not None:
            raise self.error(self.pos, f"unterminated substitution: missing '{closer}'")
        if self.heredocs:
            raise self.error(self.pos, f"here-document delimited by {self.heredocs[0][0]!r} has no body")
        self.cmd.end_command(self.pos)
        return "".join(self.out)

    def case_pattern_char(self, c: str) -> bool:
        """In a case pattern: the ``)`` ending it, the optional ``(`` before it and ``|`` between patterns. True
        when ``c`` was one of them and has been consumed."""
        if c == ")":
            self.cmd.end_word(self.pos)  # may be "esac", which closes the case: then ')' is the shell's again
        if c == ")" and self.cmd.case and self.cmd.case[-1] == "pattern":
            self.cmd.case[-1] = "body"
            self.out.append(c)
            self.pos += 1
            return True
        if c in "(|" and self.cmd.word is None:
            self.out.append(c)  # the optional '(' before a pattern, and '|' between patterns
            self.pos += 1
            return True
        return False

    def top_quote(self, c: str) -> bool:
        """At the top level: a placeholder, a backslash, ``$``, a backtick or a quote (each makes the word impure).
        True when ``c`` was one of them and has been consumed."""
        text = self.text
        if c == "_" and _PLACEHOLDER_RE.match(text, self.pos):
            self.cmd.impure(self.pos)
            self.placeholder(_TOP)
        elif c == "\\":
            if text.startswith("\\\n", self.pos):  # a line continuation: no character at all
                self.out.append("\\\n")
                self.pos += 2
                return True
            self.cmd.impure(self.pos)
            self.out.append(text[self.pos : self.pos + 2])
            self.pos += 2
        elif c == "$":
            self.cmd.impure(self.pos)
            self.dollar(_TOP)
        elif c == "`":
            self.cmd.impure(self.pos)
            self.backtick(_TOP)
        elif c == "'":
            self.cmd.impure(self.pos)
            self.single_quote()
        elif c == '"':
            self.cmd.impure(self.pos)
            self.out.append('"' + self.sub(self.pos + 1, _DQ, None) + '"')
        else:
            return False
        return True

    def top_blank(self, c: str, in_cond: bool) -> bool:
        """At the top level: a comment, a blank or a newline (which ends a command, and starts pending
        here-document bodies). True when ``c`` was one of them and has been consumed."""
        text = self.text
        if c == "#" and self.cmd.word is None:
            end = text.find("\n", self.pos)
            end = len(text) if end < 0 else end
            self.out.append(text[self.pos : end])
            self.pos = end
        elif c in " \t":
            self.cmd.end_word(self.pos)
            self.out.append(c)
            self.pos += 1
        elif c == "\n":
            self.cmd.end_word(self.pos)
            self.out.append("\n")
            self.pos += 1
            if self.heredocs:
                self.heredoc_bodies()
            if not in_cond and not self.cmd.in_pattern():
                self.cmd.end_command(self.pos)
        else:
            return False
        return True

    def top_operator(self, c: str, closer: str | None) -> bool:
        """At the top level outside ``[[ ]]``: a here-document, a redirection, a command separator or a
        parenthesis. True when ``c`` was one of them and has been consumed."""
        text = self.text
        if c == "<" and text.startswith("<<", self.pos) and not text.startswith("<<<", self.pos):
            self.cmd.end_word(self.pos)
            self.heredoc_operator()
        elif c in "<>":
            self.cmd.end_word(self.pos)
            self.cmd.redirect_next = True
            # the operator: < > >> <> >& <& >| (the '&' or '|' of a redirection ends no command)
            n = 2 if text[self.pos + 1 : self.pos + 2] in ("<", ">", "&", "|") else 1
            self.out.append(text[self.pos : self.pos + n])
            self.pos += n
        elif c == "&" and text.startswith("&>", self.pos):  # bash: &> and &>> redirect both
            self.cmd.end_word(self.pos)
            self.cmd.redirect_next = True
            n = 3 if text.startswith("&>>", self.pos) else 2
            self.out.append(text[self.pos : self.pos + n])
            self.pos += n
        elif c in ";&|":
            self.separator(c)
        elif c in "()":
            self.paren(c, closer)
        else:
            return False
        return True

    def separator(self, c: str) -> None:
        """``;``, ``&`` or ``|`` (and ``;;``, ``;;&``, ``;&`` ending a case item): the command ends."""
        text = self.text
        self.cmd.end_word(self.pos)
        if self.cmd.case and self.cmd.case[-1] == "body":
            n = 3 if text.startswith(";;&", self.pos) else 2 if text.startswith((";;", ";&"), self.pos) else 0
            if n:
                self.cmd.end_command(self.pos)
                self.out.append(text[self.pos : self.pos + n])
                self.pos += n
                self.cmd.case[-1] = "pattern"
                return
        self.cmd.end_command(self.pos)
        self.out.append(c)
        self.pos += 1

    def paren(self, c: str, closer: str | None) -> None:
        """``(`` or ``)`` at the top level: a subshell's (counted inside ``$( )``) or an ``(( ))`` arithmetic
        command, which is refused when it holds a placeholder."""
        text = self.text
        self.cmd.end_word(self.pos)
        if c == "(" and (self.cmd.command_position() or self.cmd.after_for()) and text.startswith("((", self.pos):
            close = _arith_command_end(self.text, self.pos + 2)
            if close is not None:
                self.refuse_in(self.pos + 2, close, "(( )) arithmetic")
                self.out.append(text[self.pos : close + 2])
                self.pos = close + 2
                self.cmd.end_command(self.pos)
                return
        if closer == ")":
            self.depth += 1 if c == "(" else -1
        self.cmd.end_command(self.pos)
        self.out.append(c)
        self.pos += 1

    def expansion(self, c: str, ctx: str) -> bool:
        """What a double-quoted string, a ``${...}`` word and an unquoted here-document line treat alike: a
        placeholder, a backslash escape (kept as written), ``$`` and a backtick. True when ``c`` was one of them and
        has been consumed."""
        if c == "_" and self.placeholder(ctx):
            return True
        if c == "\\":
            self.out.append(self.text[self.pos : self.pos + 2])
            self.pos += 2
            return True
        if c == "$":
            self.dollar(ctx)
            return True
        if c == "`":
            self.backtick(ctx)
            return True
        return False

    def run_word(self, ctx: str) -> str:
        """Scan a double-quoted string (to its closing quote) or the word of a ``${...}`` (to its '}')."""
        text = self.text
        while self.pos < len(text):
            c = text[self.pos]
            if ctx == _DQ and c == '"':
                self.pos += 1
                return "".join(self.out)
            if ctx in (_PARAM, _PARAM_DQ) and c == "}":
                self.pos += 1
                return "".join(self.out)
            if self.expansion(c, ctx):
                continue
            if ctx == _PARAM and c == "'":
                self.single_quote()
                continue
            if ctx in (_PARAM, _PARAM_DQ) and c == '"':
                # Nested quotes inside ${...}: dash and bash both open a fresh quoted string.
                self.out.append('"' + self.sub(self.pos + 1, _DQ, None) + '"')
                continue
            self.out.append(c)
            self.pos += 1
        if ctx == _DQ:
            raise self.error(self.pos, "unterminated double quote")
        raise self.error(self.pos, "unterminated substitution: missing '}'")

    def single_quote(self) -> None:
        quoted, self.pos = _single_quoted(self.text, self.pos, self.base, self.found, self.shared.hits)
        self.out.append(quoted)

    def sub(self, start: int, ctx: str, closer: str | None, found: set[str] | None = None) -> str:
        """Compile text[start:] in ``ctx`` up to ``closer``; advance pos past it; return the rewritten inside."""
        inner = _Scanner(self.text, self.base, self.found if found is None else found, self.shared)
        inner.pos = start
        body = inner.run(ctx, closer)
        self.pos = inner.pos
        return body

    def dollar(self, ctx: str) -> None:
        text = self.text
        p = self.pos
        if text.startswith("$((", p):
            end = self.arith_end(p + 3)
            self.refuse_in(p + 3, end, "$((...)) arithmetic")
            self.out.append(text[p : end + 2])
            self.pos = end + 2
            return
        if text.startswith("$[", p):  # bash's old arithmetic; dash prints it as it is
            bracket = _bracket_end(self.text, p + 2)
            if bracket is not None:
                self.refuse_in(p + 2, bracket, "$[...] arithmetic")
                self.out.append(text[p : bracket + 1])
                self.pos = bracket + 1
                return
        if text.startswith("$(", p):
            used: set[str] = set()
            body = self.sub(p + 2, _TOP, ")", used)
            self.found.update(used)
            self.out.append(_quote_derived(f"$({body})", ctx, used))
            return
        if text.startswith("${", p):
            self.parameter(ctx)
            return
        m = _PLACEHOLDER_RE.match(text, p + 1)
        if m is not None:
            raise self.error(
                p + 1,
                f"{m.group(0)} directly after '$' reads as a shell variable; write \\${m.group(0)} for a literal '$'",
            )
        self.out.append("$")
        self.pos = p + 1

    def parameter(self, ctx: str) -> None:
        """``${...}``: the name, a subscript, then an operator and a word in the context around it."""
        text = self.text
        p = self.pos
        q = p + 2
        if _PLACEHOLDER_RE.match(text, q) or (text[q : q + 1] in ("#", "!") and _PLACEHOLDER_RE.match(text, q + 1)):
            raise self.error(
                q + (0 if _PLACEHOLDER_RE.match(text, q) else 1),
                "a placeholder cannot be a parameter name (${_FILE_} is a shell variable)",
            )
        m = _PARAM_NAME.match(text, q)
        q = m.end() if m is not None else q
        if text.startswith("[", q):
            end = _bracket_end(self.text, q + 1)
            if end is not None:
                self.refuse_in(q + 1, end, "an array subscript")
                q = end + 1
        # ${name:offset} and ${name:offset:length} (a ':' not followed by - = ? +) are arithmetic in bash
        arithmetic = text.startswith(":", q) and text[q + 1 : q + 2] not in ("-", "=", "?", "+")
        h0 = len(self.shared.hits)
        body = self.sub(p + 2, _PARAM if ctx in (_TOP, _PARAM) else _PARAM_DQ, "}")
        if arithmetic and len(self.shared.hits) > h0:
            at = self.shared.hits[h0]
            raise ShellSyntaxError(
                at, f"a placeholder inside the ${{name:offset:length}} of a substring is refused: {_ARITH_WHY}"
            )
        self.out.append("${" + body + "}")

    def arith_end(self, start: int) -> int:
        end = _arith_command_end(self.text, start)
        if end is None:
            raise self.error(start - 3, "unterminated $((...))")
        return end

    def backtick(self, ctx: str) -> None:
        start = self.pos
        inner_text, i = _backtick_command(self.text, start, ctx, self.base)
        try:
            inner = compile_command(inner_text)
        except ShellSyntaxError as e:
            raise self.error(start + 1, f"inside backticks: {e.reason}") from None
        if inner.placeholders:
            self.shared.hits.append(self.base + start)
        self.found.update(inner.placeholders)
        # Redo the escapes so that the shell's unescaping gives back exactly the compiled inner text.
        # A plain "$" needs no escape: the shell keeps it and the inner parse expands it.
        escaped = inner.script.replace("\\", "\\\\").replace("`", "\\`")
        self.out.append(_quote_derived(f"`{escaped}`", ctx, inner.placeholders))
        self.pos = i + 1

    # -- here-documents ------------------------------------------------------------------------------------------

    def heredoc_operator(self) -> None:
        delim, quoted, strip, end = _heredoc_operator(self.text, self.pos, self.base)
        self.heredocs.append((delim, quoted, strip))
        self.out.append(self.text[self.pos : end])
        self.pos = end

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
        inner = _Scanner(self.text[:end], self.base, self.found, self.shared)
        inner.pos = start
        text = inner.text
        while inner.pos < end:
            c = text[inner.pos]
            if inner.expansion(c, _HEREDOC):
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
    if ctx in (_TOP, _PARAM) and any(p != FILES for p in used):
        return f'"{subst}"'
    return subst


def compile_command(text: str) -> CompiledCommand:
    """Rewrite ``text`` so that placeholders become variable references; raise ShellSyntaxError if impossible."""
    found: set[str] = set()
    scanner = _Scanner(text, 0, found)
    script = scanner.run(_TOP)
    shared = scanner.shared
    if shared.attributes_at is not None and shared.hits:
        raise ShellSyntaxError(
            shared.hits[0],
            "placeholders are refused in a command that declares integer or nameref variables (declare/typeset/"
            f"local -i or -n, column {shared.attributes_at + 1}): bash evaluates what is assigned to them "
            "(a name like a[$(cmd)] runs cmd)",
        )
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
    uid: int | None = None  # credentials set in the child before exec (None: the daemon's)
    gid: int | None = None
    groups: tuple[int, ...] | None = None  # supplementary groups


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
