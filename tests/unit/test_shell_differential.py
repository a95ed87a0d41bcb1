"""The placeholder scanner against the real shells: commands built from pieces (quotes, ``$()``, backticks, ``${...}``,
``case``, comments, here-documents, arithmetic) are loaded as a config would be and run under **both dash and bash**
with hostile file names. Each command is either refused by the config loader (exactly when it puts a placeholder
where bash would evaluate it: arithmetic, subscripts, variable names) or every placeholder reaches the command as
exactly the argument the piece says; a name is never executed (no ``pwn`` file appears in the working directory).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwatch.actions.runner import Runner
from kwatch.events import FileEvent, Op
from kwatch.rules import parse_config
from kwatch.rules.match import match_config

SHELLS = ("/usr/bin/dash", "/usr/bin/bash")
PWN = "pwn"  # what the hostile names try to create, relative to the shell's working directory

HOSTILE: dict[str, bytes] = {
    "words and an option": b"a b -rf x",
    "array subscript": b"a[$(touch " + PWN.encode() + b")]",
    "command substitution": b"$(touch " + PWN.encode() + b")",
    "backticks": b"`touch " + PWN.encode() + b"`",
    "quotes": b"it's \"q\" '",
    "newlines": b"\nline\n\n",
    "case syntax": b"x) esac ;; *)",
    "comment and braces": b"#}{)(",
    "glob": b"*",
    "option": b"-n",
    "arithmetic": b"1+1",
    "non-utf8": b"\xff\xfe caf\xe9",
    "dollar forms": b"${HOME}$IFS$1$@",
    "backslashes": b"a\\b\\",
}


@dataclass(frozen=True)
class Piece:
    """Shell text and the one argument it must become, given the file name."""

    text: str
    expect: Callable[[bytes], bytes]


def _strip(f: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
    # command substitution drops trailing newlines, as it always does
    return lambda v: f(v).rstrip(b"\n")


def _cat(a: Piece, b: Piece, sep: str = "") -> Piece:
    return Piece(a.text + sep + b.text, lambda v: a.expect(v) + sep.encode() + b.expect(v))


PH = Piece("_FILE_", lambda v: v)
LIT = Piece("lit", lambda v: b"lit")
LEN = Piece("${#KW_LEN}", lambda v: b"3")  # KW_LEN=abc in the environment; '#' here is no comment


@st.composite
def dq_part(draw: st.DrawFn, depth: int) -> Piece:
    """Something that stands inside "...": text, the placeholder, substitutions, ${...} words, a case."""
    options = ["text", "ph", "len", "default"]
    if depth > 0:
        options += ["cmdsub", "case"]
    kind = draw(st.sampled_from(options))
    if kind == "text":
        return Piece("-t-", lambda v: b"-t-")  # no blank: a substitution without a placeholder is split, on purpose
    if kind == "ph":
        return PH
    if kind == "len":
        return LEN
    if kind == "default":
        return Piece("${KW_UNSET:-_FILE_}", lambda v: v)
    inner = draw(word(depth - 1))
    if kind == "cmdsub":
        return Piece(f"$(printf '%s' {inner.text})", _strip(inner.expect))
    return _case(draw, inner, depth)


def _case(draw: st.DrawFn, inner: Piece, depth: int) -> Piece:
    """``$(case WORD in PATTERN) printf WORD;; esac)``: the pattern's ')' does not end the substitution."""
    pattern = draw(st.sampled_from(["*", "(*", "nomatch|*", '"x)"|*', "x|*"]))
    subject = draw(st.sampled_from([PH, LIT]))
    return Piece(
        f"$(case {subject.text} in nomatch) printf no;; {pattern}) printf '%s' {inner.text};; esac)",
        _strip(inner.expect),
    )


@st.composite
def word(draw: st.DrawFn, depth: int = 2) -> Piece:
    """One unquoted shell word that must expand to exactly one argument."""
    options = ["ph", "lit", "sq", "dq", "len", "heredoc"]
    if depth > 0:
        options += ["cmdsub", "backtick", "default", "case", "concat", "hash"]
    kind = draw(st.sampled_from(options))
    if kind == "ph":
        return PH
    if kind == "lit":
        return LIT
    if kind == "len":
        return LEN
    if kind == "sq":
        return Piece("'a _FILE_ b'", lambda v: b"a " + v + b" b")
    if kind == "dq":
        parts = draw(st.lists(dq_part(depth), min_size=1, max_size=3))
        return Piece(
            '"' + "".join(p.text for p in parts) + '"', lambda v: b"".join(p.expect(v) for p in parts)
        )
    if kind == "heredoc":
        return Piece("$(cat <<EOF\nh _FILE_\nEOF\n)", lambda v: (b"h " + v).rstrip(b"\n"))
    if kind == "cmdsub":
        inner = draw(word(depth - 1))
        return Piece(f"$(printf '%s' {inner.text})", _strip(inner.expect))
    if kind == "backtick":
        inner = draw(word(depth - 1).filter(lambda p: "`" not in p.text))
        return Piece(f"`printf '%s' {inner.text}`", _strip(inner.expect))
    if kind == "default":
        inner = draw(word(depth - 1).filter(lambda p: "}" not in p.text and "\n" not in p.text))
        return Piece("${KW_UNSET:-" + inner.text + "}", inner.expect)
    if kind == "case":
        return _case(draw, draw(word(depth - 1)), depth)
    a, b = draw(word(depth - 1)), draw(word(depth - 1))
    return _cat(a, b, "#" if kind == "hash" else "")


# Statements before the checked command. True: the loader must refuse the command (bash would evaluate the name).
STATEMENTS: dict[str, tuple[str, bool]] = {
    "comment": ("# _FILE_ ) ' \" $( `", False),
    "case statement": ("case _FILE_ in *.none) exit 3;; (*) : _FILE_ ;; esac", False),
    "if test": ("if [ -n _FILE_ ]; then :; fi", False),
    "function": ("f() { : _FILE_; }; f", False),
    "derived number": ("n=$(printf '%s' _FILE_ | wc -c); : $((n + 1))", False),
    "redirect target": (": < /dev/null > /dev/null", False),
    "arithmetic command": ("(( $(printf '%s' _FILE_) > 0 ))", True),
    "dollar arithmetic": (": $((_FILE_))", True),
    "old arithmetic": (": $[_FILE_]", True),
    "let": ("let n=_FILE_", True),
    "numeric test": ("[[ _FILE_ -gt 0 ]]", True),
    "subscript assignment": ("a[_FILE_]=1", True),
    "compound assignment": ("a=(x); a+=([_FILE_]=1)", True),
    "substring offset": ("y=abc; : ${y:_FILE_}", True),
    "subscript expansion": (": ${a[_FILE_]}", True),
    "for arithmetic": ("for ((i=_FILE_; i<0; )); do :; done", True),
    "test -v": ("test -v _FILE_", True),
    "declare": ("declare n=_FILE_", True),
    "integer attribute": ("typeset -i n; n=_FILE_", True),
    "read name": ("read _FILE_ < /dev/null", True),
    "printf -v": ("printf -v _FILE_ x", True),
}


@pytest.fixture
def argv_script(tmp_path: Path) -> tuple[str, Path]:
    script = tmp_path / "argv.sh"
    script.write_text('#!/bin/sh\nfor a; do printf \'%s\\0\' "$a"; done > "$KW_OUT"\n')
    script.chmod(0o755)
    return str(script), tmp_path / "out"


def _load(command: str) -> tuple[object, list[str]]:
    text = f'[[rule]]\nmatch = "^/"\non = ["CLOSEW"]\nrun = {json.dumps(command)}\n'
    cfg, errs = parse_config(text, "differential.toml", toml=True)
    return cfg, [str(e) for e in errs]


def _run(command: str, name: bytes, out: Path, shell: str, cwd: Path) -> list[bytes] | None:
    """The arguments the command gave argv.sh under ``shell``, or None when the config loader refused it."""
    cfg, errs = _load(command)
    if cfg is None:
        assert errs and all("refused" in e or "parameter name" in e for e in errs), errs
        return None
    path = b"/p/" + name
    matches = match_config(cfg, FileEvent(Op.CLOSE_WRITE, path, pid=1))  # type: ignore[attr-defined]
    env = {b"PATH": b"/usr/bin:/bin", b"KW_OUT": bytes(out), b"KW_LEN": b"abc"}
    spec = Runner(dry_run=True, env=env, shell=shell).plan(matches[0])
    if out.exists():
        out.unlink()
    proc = subprocess.run(list(spec.argv), env=dict(spec.env), cwd=cwd, capture_output=True, timeout=30, check=False)
    assert not (cwd / PWN).exists(), f"{shell} executed part of the name {name!r}: {command!r}"
    assert proc.returncode == 0 and out.exists(), (shell, command, proc.returncode, proc.stderr)
    data = out.read_bytes()
    return data[:-1].split(b"\0") if data else []


def _check(command: str, expect: list[bytes] | None, name: bytes, argv_script: tuple[str, Path], cwd: Path) -> None:
    script, out = argv_script
    command = command.replace("ARGV", script)
    for shell in SHELLS:
        got = _run(command, name, out, shell, cwd)
        assert got == expect, (shell, command, name)


@pytest.mark.parametrize("statement", list(STATEMENTS), ids=list(STATEMENTS))
@pytest.mark.parametrize("name", list(HOSTILE), ids=list(HOSTILE))
def test_statement(statement: str, name: str, argv_script: tuple[str, Path], tmp_path: Path) -> None:
    text, refused = STATEMENTS[statement]
    path = b"/p/" + HOSTILE[name]
    _check(f"{text}\nARGV _FILE_", None if refused else [path], HOSTILE[name], argv_script, tmp_path)


# The cases the scanner got wrong, each as one named command: (command, expected arguments from the path).
KNOWN: dict[str, tuple[str, Callable[[bytes], list[bytes]] | None]] = {
    "case pattern paren in quoted substitution": (
        "ARGV \"$(case _FILE_ in *) printf '%s' _FILE_;; esac)\"", lambda p: [p.rstrip(b"\n")]
    ),
    "case pattern paren in bare substitution": (
        "ARGV $(case _FILE_ in (*) printf '%s' _FILE_;; esac) x", lambda p: [p.rstrip(b"\n"), b"x"]
    ),
    "hash after substitution": ("ARGV $(printf x)#_FILE_", lambda p: [b"x#" + p]),
    "hash after length": ("ARGV ${#KW_LEN}#_FILE_", lambda p: [b"3#" + p]),
    "length then placeholder": ("ARGV ${#KW_LEN}_FILE_", lambda p: [b"3" + p]),
    "pattern removal": ("ARGV ${KW_LEN#_FILE_}", lambda p: [b"abc"]),
    "arithmetic command": ("(( $(basename _FILE_) > 0 )); ARGV", None),
    "name as subscript": ("a[_FILE_]=1; ARGV", None),
}


@pytest.mark.parametrize("case", list(KNOWN), ids=list(KNOWN))
@pytest.mark.parametrize("name", list(HOSTILE), ids=list(HOSTILE))
def test_known(case: str, name: str, argv_script: tuple[str, Path], tmp_path: Path) -> None:
    command, expect = KNOWN[case]
    path = b"/p/" + HOSTILE[name]
    _check(command, None if expect is None else expect(path), HOSTILE[name], argv_script, tmp_path)


names = st.one_of(
    st.sampled_from(list(HOSTILE.values())),
    st.binary(min_size=1, max_size=24).filter(lambda b: b"\0" not in b),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    words=st.lists(word(), min_size=1, max_size=3),
    before=st.lists(st.sampled_from(list(STATEMENTS)), max_size=2),
    sep=st.sampled_from(["; ", "\n"]),
    trailing=st.booleans(),
    name=names,
)
def test_generated(
    words: list[Piece],
    before: list[str],
    sep: str,
    trailing: bool,
    name: bytes,
    argv_script: tuple[str, Path],
    tmp_path: Path,
) -> None:
    # a comment ends at the newline: a statement after one needs a newline, whatever the separator
    stmts = [STATEMENTS[s][0] + ("\n" if s == "comment" else sep) for s in before]
    command = "".join(stmts) + "ARGV " + " ".join(w.text for w in words)
    if trailing:
        command += " # ) _FILE_ '"
    refused = any(STATEMENTS[s][1] for s in before)
    path = b"/p/" + name
    _check(command, None if refused else [w.expect(path) for w in words], name, argv_script, tmp_path)
