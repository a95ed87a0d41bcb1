"""Placeholders reach the real command as exactly one argument, whatever the file name and wherever the admin put
the placeholder; nothing in a name is ever executed (a canary file is never created)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwatch.actions.runner import Runner
from kwatch.events import FileEvent, Op
from kwatch.rules import parse_config
from kwatch.rules.match import match_config
from kwatch.rules.shell import ShellSyntaxError, compile_command, shell_quote

CANARY = "/tmp/kwatch-canary-quoting"

HOSTILE: dict[str, bytes] = {
    "plain": b"photo.jpg",
    "spaces": b"a  b c.jpg",
    "brief example": b"a b'; rm -rf ~ #.jpg",
    "command substitution": b"$(touch " + CANARY.encode() + b").jpg",
    "backticks": b"`touch " + CANARY.encode() + b"`.jpg",
    "single quote breakout": b"x'; touch " + CANARY.encode() + b"; '",
    "double quote breakout": b'x"; touch ' + CANARY.encode() + b'; "',
    "IFS trick": b"$(touch${IFS}" + CANARY.encode() + b")",
    "parameter": b"${HOME}$HOME$1$@$*",
    "newline": b"line1\nline2.jpg",
    "tab and cr": b"a\tb\rc",
    "leading dash": b"-rf --help",
    "glob": b"*",
    "glob class": b"[a-z]?*.jpg",
    "backslashes": b"a\\b\\\\c\\",
    "non-utf8": b"caf\xe9 \xff\xfe.jpg",
    "invalid utf8 in quote": b"\xc3'\xa9\"$`",
    "tilde": b"~root",
    "semicolon and pipe": b"a;b|c&d>e<f",
    "hash": b"#not a comment",
    "percent": b"%s%n%d",
    "only quotes": b"''\"\"",
    "dollar quote": b"$'\\x41'",
}

# (placeholder context as the admin writes it, function: value -> the one argument the script must receive)
CONTEXTS: dict[str, tuple[str, object]] = {
    "unquoted": ("{s} _FILE_", lambda v: v),
    "single quoted": ("{s} '_FILE_'", lambda v: v),
    "double quoted": ('{s} "_FILE_"', lambda v: v),
    "adjacent": ("{s} /mirrors/otto_FILE_", lambda v: b"/mirrors/otto" + v),
    "both sides": ("{s} pre_FILE_post", lambda v: b"pre" + v + b"post"),
    "inside single quotes with text": ("{s} 'x _FILE_ y'", lambda v: b"x " + v + b" y"),
    "inside double quotes with text": ('{s} "x _FILE_ y"', lambda v: b"x " + v + b" y"),
    "backticks": ("{s} `printf '%s' _FILE_`", lambda v: v.rstrip(b"\n")),
    "dollar paren": ("{s} $(printf '%s' _FILE_)", lambda v: v.rstrip(b"\n")),
    "dollar paren in dq": ('{s} "$(printf \'%s\' _FILE_)"', lambda v: v.rstrip(b"\n")),
    "backticks in dq": ('{s} "`printf \'%s\' \\"_FILE_\\"`"', lambda v: v.rstrip(b"\n")),
    "nested backticks": ("{s} `printf '%s' \\`printf '%s' _FILE_\\``", lambda v: v.rstrip(b"\n")),
    "default expansion": ("{s} ${UNSET_KW:-_FILE_}", lambda v: v),
    "default expansion in dq": ('{s} "${UNSET_KW:-_FILE_}"', lambda v: v),
    "here-document": ("{s} \"$(cat <<EOF\n_FILE_\nEOF\n)\"", lambda v: v.rstrip(b"\n")),
    "escaped dollar": ("{s} \\$_FILE_", lambda v: b"$" + v),
    "_FILES_": ("{s} _FILES_", lambda v: v),
    "quoted for another shell": ('/bin/sh -c "{s} /m/otto_QFILE_"', lambda v: b"/m/otto" + v),
}


@pytest.fixture
def argv_script(tmp_path: Path) -> tuple[str, Path]:
    """A tiny /bin/sh script that writes its arguments, each followed by NUL, to $KW_OUT."""
    script = tmp_path / "argv.sh"
    script.write_text('#!/bin/sh\nfor a; do printf \'%s\\0\' "$a"; done > "$KW_OUT"\n')
    script.chmod(0o755)
    return str(script), tmp_path / "out"


def run_action(command: str, path: bytes, out: Path, op: Op = Op.CLOSE_WRITE, new_path: bytes | None = None) -> list[bytes]:
    """Load ``command`` as an OPENW/RENAME action, match an event, run the planned argv.

    One-line commands go through the changedfiles format, multi-line ones (here-documents) through TOML.
    """
    kw = "RENAME" if op is Op.RENAME else "OPENW"
    if "\n" in command:
        text = f'[[rule]]\nmatch = "^/"\non = ["{kw}"]\nrun = {json.dumps(command)}\n'
        cfg, errs = parse_config(text, "quoting.toml", toml=True)
    else:
        cfg, errs = parse_config(f"RULE ^/\n{kw} {command}\n", "quoting.conf", toml=False)
    assert cfg is not None, errs
    matches = match_config(cfg, FileEvent(op, path, new_path=new_path, pid=42))
    assert len(matches) == 1
    env = {b"PATH": b"/usr/bin:/bin", b"KW_OUT": bytes(out)}
    spec = Runner(dry_run=True, env=env).plan(matches[0])
    if out.exists():
        out.unlink()
    proc = subprocess.run(list(spec.argv), env=dict(spec.env), capture_output=True, check=False)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data.endswith(b"\0")
    return data[:-1].split(b"\0")


@pytest.fixture(autouse=True)
def no_canary() -> object:
    if os.path.exists(CANARY):
        os.unlink(CANARY)
    yield
    assert not os.path.exists(CANARY), "a file name was executed"


@pytest.mark.parametrize("ctx", list(CONTEXTS), ids=list(CONTEXTS))
@pytest.mark.parametrize("name", list(HOSTILE), ids=list(HOSTILE))
def test_hostile_name_is_one_argument(name: str, ctx: str, argv_script: tuple[str, Path]) -> None:
    script, out = argv_script
    template, expect = CONTEXTS[ctx]
    path = b"/tmp/kwatch q/" + HOSTILE[name]
    got = run_action(template.replace("{s}", script), path, out)
    assert got == [expect(path)]  # type: ignore[operator]


@pytest.mark.parametrize("name", list(HOSTILE), ids=list(HOSTILE))
def test_rename_placeholders(name: str, argv_script: tuple[str, Path]) -> None:
    script, out = argv_script
    old, new = b"/d/old " + HOSTILE[name], b"/d/new " + HOSTILE[name]
    got = run_action(f"{script} _OLD_FILE_ -- '_NEW_FILE_' \"_FILE_\" x_OLD_FILE_", old, out, Op.RENAME, new)
    assert got == [old, b"--", new, new, b"x" + old]


def test_verbatim_convert_example_words(argv_script: tuple[str, Path]) -> None:
    # The brief's OPENW line, with the script standing in for convert: dirname/basename work on names with spaces.
    script, out = argv_script
    path = b"/export/home/image-converter/my \"holiday\" pic's 1.jpg"
    got = run_action(f"{script} _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png", path, out)
    assert got == [path, path[:-4] + b".png"]


def test_environment_variables(argv_script: tuple[str, Path]) -> None:
    script, out = argv_script
    cmd = f'{script} "$KWATCH_FILE" "$KWATCH_OLD_FILE" "$KWATCH_NEW_FILE" "$KWATCH_OP" "$KWATCH_PID" "$KWATCH_QFILE"'
    got = run_action(cmd, b"/a/x y", out, Op.RENAME, b"/a/\xff z")
    assert got == [b"/a/\xff z", b"/a/x y", b"/a/\xff z", b"rename", b"42", b"'/a/\xff z'"]


def test_stale_kwatch_variables_are_not_inherited(argv_script: tuple[str, Path]) -> None:
    script, out = argv_script
    cfg, _ = parse_config(f'RULE ^/\nUNLINK {script} "$KWATCH_NEW_FILE"\n', "t.conf", toml=False)
    assert cfg is not None
    m = match_config(cfg, FileEvent(Op.UNLINK, b"/gone"))[0]
    spec = Runner(dry_run=True, env={b"KWATCH_NEW_FILE": b"stale", b"KW_OUT": bytes(out)}).plan(m)
    assert spec.env[b"KWATCH_NEW_FILE"] == b""


def test_dry_run_argv_is_exact() -> None:
    cfg, _ = parse_config(
        "RULE ^/export/home/image-converter.*\\.jpg$\n"
        "OPENW  /usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png\n",
        "x.conf",
        toml=False,
    )
    assert cfg is not None
    m = match_config(cfg, FileEvent(Op.CLOSE_WRITE, b"/export/home/image-converter/a b.jpg", pid=7))[0]
    spec = Runner(dry_run=True, env={b"PATH": b"/bin"}).plan(m)
    assert spec.argv == (
        b"/bin/sh",
        b"-c",
        b'/usr/bin/convert "${KWATCH_FILE}" "`dirname "${KWATCH_FILE}"`"/"`basename "${KWATCH_FILE}" .jpg`".png',
        b"kwatch",
        b"/export/home/image-converter/a b.jpg",
    )
    assert spec.env[b"KWATCH_FILE"] == b"/export/home/image-converter/a b.jpg"
    assert spec.env[b"KWATCH_OP"] == b"close_write"
    assert spec.env[b"KWATCH_PID"] == b"7"
    assert spec.env[b"PATH"] == b"/bin"


COMPILED: dict[str, tuple[str, str]] = {
    "no placeholder": ("ls -l", "ls -l"),
    "unquoted": ("rm _FILE_", 'rm "${KWATCH_FILE}"'),
    "longest first": ("mv _OLD_FILE_ _NEW_FILE_", 'mv "${KWATCH_OLD_FILE}" "${KWATCH_NEW_FILE}"'),
    "adjacent": ("rm /m/otto_FILE_", 'rm /m/otto"${KWATCH_FILE}"'),
    "single quotes": ("echo 'a _FILE_'", "echo 'a '\"${KWATCH_FILE}\"''"),
    "double quotes": ('echo "a _FILE_"', 'echo "a ${KWATCH_FILE}"'),
    "comment kept": ("true # _FILE_ it's", "true # _FILE_ it's"),
    "hash inside word": ("echo a#_FILE_", 'echo a#"${KWATCH_FILE}"'),
    "escaped stays literal": ("echo \\_FILE_", "echo \\_FILE_"),
    "files": ("tar -cf /t.tar _FILES_", 'tar -cf /t.tar "$@"'),
    "files in substitution not quoted": ("ls $(echo _FILES_)", 'ls $(echo "$@")'),
    "arithmetic without placeholder": ("echo $((1+2))", "echo $((1+2))"),
    "case pattern in substitution": (
        "echo $(case _FILE_ in *) echo _FILE_;; esac)",
        'echo "$(case "${KWATCH_FILE}" in *) echo "${KWATCH_FILE}";; esac)"',
    ),
    "hash after substitution": ("echo $(echo a)#_FILE_", 'echo $(echo a)#"${KWATCH_FILE}"'),
    "hash in length": ("echo ${#x}_FILE_ # c _FILE_", 'echo ${#x}"${KWATCH_FILE}" # c _FILE_'),
    "redirect target of read": ("read -r l < _FILE_", 'read -r l < "${KWATCH_FILE}"'),
    "arithmetic on a derived number": (
        "n=$(wc -c < _FILE_); echo $((n+1))",
        'n="$(wc -c < "${KWATCH_FILE}")"; echo $((n+1))',
    ),
    "string test": ("[[ _FILE_ == *.jpg ]]", '[[ "${KWATCH_FILE}" == *.jpg ]]'),
    "brackets in an argument": ("echo x[_FILE_]=1", 'echo x["${KWATCH_FILE}"]=1'),
    "redirection with &": ("read x 2>&1 < _FILE_", 'read x 2>&1 < "${KWATCH_FILE}"'),
}


@pytest.mark.parametrize("case", list(COMPILED), ids=list(COMPILED))
def test_compiled_text(case: str) -> None:
    src, want = COMPILED[case]
    assert compile_command(src).script == want


A = "bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"

REFUSED: dict[str, tuple[str, int, str]] = {
    "dollar before": ("echo $_FILE_", 6, "_FILE_ directly after '$' reads as a shell variable; write \\$_FILE_ for a literal '$'"),
    "parameter name": ("echo ${_FILE_}", 7, "a placeholder cannot be a parameter name (${_FILE_} is a shell variable)"),
    "arithmetic": ("echo $((_FILE_ + 1))", 8, "_FILE_ inside $((...)) arithmetic is refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"),
    "arithmetic command": ("(( $(basename _FILE_) > 0 ))", 14, "_FILE_ inside (( )) arithmetic is refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"),
    "old arithmetic": ("echo $[_FILE_]", 7, "_FILE_ inside $[...] arithmetic is refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"),
    "let": ("let n=_FILE_", 6, "a placeholder in the arguments of let is refused: let evaluates its arguments as "
            "arithmetic, so a name like a[$(cmd)] would run cmd; assign it to a variable first (f=_FILE_)"),
    "numeric test": ("[[ _FILE_ -gt 0 ]]", 3, "_FILE_ inside a [[ ]] test with -eq/-ne/-lt/-le/-gt/-ge/-v/-R is "
                     "refused: bash evaluates those operands as arithmetic or variable names, so a name like "
                     "a[$(cmd)] would run cmd; compare the file name in a [[ ]] of its own"),
    "subscript": ("a[_FILE_]=1", 2, "_FILE_ inside an array subscript is refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"),
    "substring offset": ("echo ${x:_FILE_}", 9, "a placeholder inside the ${name:offset:length} of a substring is "
                         "refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd)"),
    "integer attribute": ("typeset -i n; n=_FILE_", 16, "placeholders are refused in a command that declares integer "
                          "or nameref variables (declare/typeset/local -i or -n, column 1): bash evaluates what is "
                          "assigned to them (a name like a[$(cmd)] runs cmd)"),
    "length of a placeholder": ("echo ${#_FILE_}", 8,
                                "a placeholder cannot be a parameter name (${_FILE_} is a shell variable)"),
    "subscript after an assignment": ("x=1 a[_FILE_]=2 cmd", 6, f"_FILE_ inside an array subscript is refused: {A}"),
    "let after a pipe from a redirection": (
        "echo 2>&1 | let n=_FILE_", 18, "a placeholder in the arguments of let is refused: let evaluates its "
        "arguments as arithmetic, so a name like a[$(cmd)] would run cmd; assign it to a variable first (f=_FILE_)"),
    "files quoted": ('echo "_FILES_"', 6, '_FILES_ must stand as a separate, unquoted word (it becomes "$@")'),
    "files adjacent": ("echo x_FILES_", 6, '_FILES_ must stand as a separate, unquoted word (it becomes "$@")'),
    "unterminated single": ("echo 'abc", 5, "unterminated single quote"),
    "unterminated double": ('echo "abc', 9, "unterminated double quote"),
    "unterminated subst": ("echo $(ls", 9, "unterminated substitution: missing ')'"),
    "unterminated backtick": ("echo `ls", 5, "unterminated backtick substitution"),
    "quoted heredoc": (
        "cat <<'E'\n_FILE_\nE",
        10,
        "_FILE_ inside a here-document with a quoted delimiter is never expanded; unquote the delimiter",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED), ids=list(REFUSED))
def test_refused(case: str) -> None:
    src, offset, reason = REFUSED[case]
    with pytest.raises(ShellSyntaxError) as ei:
        compile_command(src)
    assert (ei.value.offset, ei.value.reason) == (offset, reason)


names = st.binary(min_size=1, max_size=40).filter(lambda b: b"\0" not in b)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(name=names, other=names)
def test_property_arbitrary_bytes_round_trip(name: bytes, other: bytes, argv_script: tuple[str, Path]) -> None:
    script, out = argv_script
    path = b"/p/" + name
    new = b"/q/" + other
    cmd = f"{script} _FILE_ '_OLD_FILE_' \"x_NEW_FILE_\" `printf '%s|' _FILE_` /bin/sh -c '_QFILE_'"
    got = run_action(cmd, path, out, Op.RENAME, new)
    assert got == [new, path, b"x" + new, (new + b"|"), b"/bin/sh", b"-c", shell_quote(new)]
    assert not os.path.exists(CANARY)
