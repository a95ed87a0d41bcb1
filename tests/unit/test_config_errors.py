"""Broken configs: every error is reported (not just the first), each with file, line and reason, word for word."""

from __future__ import annotations

from pathlib import Path

import pytest

from kwatch.rules import ConfigErrors, check_config, load_config

KW = "OPENW, CLOSEW, CREATE, MKDIR, SYMLINK, UNLINK, RMDIR, RENAME, LINK, TRUNCATE, ATTRIB, ANY"

# (file name, text, every expected message in file/line order)
CASES: dict[str, tuple[str, str, list[str]]] = {
    "action before RULE": ("c.conf", "UNLINK rm _FILE_\n", ["c.conf:1: UNLINK before the first RULE"]),
    "ignore before RULE": ("c.conf", "# x\nIGNORE foo\n", ["c.conf:2: IGNORE before the first RULE"]),
    "rule without regex": ("c.conf", "RULE\n", ["c.conf:1: RULE needs a regex"]),
    "bad regex": (
        "c.conf",
        "RULE ^/a(b\nUNLINK true\n",
        ["c.conf:1: bad regex '^/a(b': missing ), unterminated subpattern at position 3"],
    ),
    "bad ignore regex": (
        "c.conf",
        "RULE ^/a\nIGNORE [z\nUNLINK true\n",
        ["c.conf:2: bad regex '[z': unterminated character set at position 0"],
    ),
    "unknown keyword": (
        "c.conf",
        "RULE ^/a\nCHMOD true\n",
        ["c.conf:1: warning: RULE ^/a has no actions", f"c.conf:2: unknown keyword 'CHMOD'; expected RULE, IGNORE, REPLICATE or one of {KW}"],
    ),
    "lower-case keyword": (
        "c.conf",
        "RULE ^/a\nopenw true\n",
        [
            "c.conf:1: warning: RULE ^/a has no actions",
            f"c.conf:2: unknown keyword 'openw' (keywords are upper case: OPENW); expected RULE, IGNORE, REPLICATE or one of {KW}",
        ],
    ),
    "empty command": ("c.conf", "RULE ^/a\nUNLINK\n", ["c.conf:2: UNLINK: empty command"]),
    "rule without actions": ("c.conf", "RULE ^/a\n", ["c.conf:1: warning: RULE ^/a has no actions"]),
    "placeholder after dollar": (
        "c.conf",
        "RULE ^/a\nUNLINK echo $_FILE_\n",
        ["c.conf:2: command: _FILE_ directly after '$' reads as a shell variable; write \\$_FILE_ for a literal '$' (column 14)"],
    ),
    "placeholder in arithmetic": (
        "c.conf",
        "RULE ^/a\nUNLINK echo $((_FILE_))\n",
        ["c.conf:2: command: _FILE_ inside $((...)) arithmetic is refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd) (column 16)"],
    ),
    "unterminated quote": ("c.conf", "RULE ^/a\nUNLINK echo 'x\n", ["c.conf:2: command: unterminated single quote (column 13)"]),
    "continuation keeps the first line number": (
        "c.conf",
        "RULE ^/a\nUNLINK echo \\\n 'x\n",
        ["c.conf:2: command: unterminated single quote (column 14)"],
    ),
    "every error of a changedfiles file": (
        "many.conf",
        "UNLINK x\nRULE (\nUNLINK true\nRULE ^/ok\nFOO bar\nRMDIR echo `x\nRULE ^/fine\nUNLINK rm _FILE_\n",
        [
            "many.conf:1: UNLINK before the first RULE",
            "many.conf:2: bad regex '(': missing ), unterminated subpattern at position 0",
            f"many.conf:5: unknown keyword 'FOO'; expected RULE, IGNORE, REPLICATE or one of {KW}",
            "many.conf:6: command: unterminated backtick substitution (column 12)",
        ],
    ),
    "toml syntax error": ("k.toml", "[[rule]]\nmatch = \n", ["k.toml:2: Invalid value (column 9)"]),
    "toml unknown keys and bad values": (
        "k.toml",
        "[runner]\nmax_concurency = 3\n[defaults]\ndebounce = -1\nbatch = 'yes'\n[[rule]]\nmatch = '('\non = ['OPENW', 'CHMOD']\nrun = 'echo $((_FILE_))'\n",
        [
            "k.toml:2: unknown key 'max_concurency' in [runner] (allowed: max_concurrency, shell)",
            "k.toml:4: debounce must be >= 0, not -1",
            "k.toml:5: batch must be false, \"args\" or \"stdin\", not 'yes'",
            "k.toml:7: bad regex '(': missing ), unterminated subpattern at position 0",
            f"k.toml:9: unknown operation 'CHMOD' (expected one of {KW}, or op:<event op>)",
            "k.toml:9: command: _FILE_ inside $((...)) arithmetic is refused: bash evaluates it as arithmetic (a name like a[$(cmd)] runs cmd) (column 9)",
        ],
    ),
    "toml rule problems in several rule sets": (
        "k.toml",
        "[[ruleset]]\nname = 'a'\n[[ruleset.rule]]\nmatch = '^/a'\n\n[[ruleset]]\nname = 'b'\n"
        "[[ruleset.rule]]\non = 'UNLINK'\nrun = 'true'\n[[ruleset.rule]]\nmatch = '^/c'\non = 'UNLINK'\nrun = 'true'\n"
        "debounse = 1\n",
        [
            "k.toml:3: a rule needs on/run or [[...action]] tables",
            "k.toml:8: a rule needs 'match' (a regex for the path)",
            "k.toml:15: unknown key 'debounse' in a rule (allowed: name, match, ignore, on, run, alert, level, action, "
            "concurrency, debounce, debounce_max, timeout, kill_grace, batch, batch_window, batch_max, retrigger, user, "
            "group)",
        ],
    ),
    "toml batch misuse": (
        "k.toml",
        "[[rule]]\nmatch = '/'\n[[rule.action]]\non = 'CREATE'\nrun = 'convert _FILE_ x.png'\nbatch = 'args'\n"
        "[[rule.action]]\non = 'CREATE'\nrun = 'ls _FILES_'\nbatch = 'stdin'\n[[rule.action]]\non = 'CREATE'\nrun = 'ls'\nbatch = 'args'\n",
        [
            "k.toml:5: _FILE_ cannot be used in a batch action (one command gets many files): use _FILES_ with "
            'batch = "args", or read NUL-separated paths from stdin with batch = "stdin"',
            "k.toml:5: warning: batch = \"args\" passes the files as arguments, but the command uses neither _FILES_ "
            'nor "$@"',
            'k.toml:9: _FILES_ is empty with batch = "stdin" (the files arrive on stdin); use batch = "args" for '
            "arguments",
            'k.toml:13: warning: batch = "args" passes the files as arguments, but the command uses neither _FILES_ '
            'nor "$@"',
        ],
    ),
    "toml process filter types": (
        "k.toml",
        "[[ruleset]]\n[ruleset.process]\nuid = ['root']\nexclude_descendants_of = [0]\npid = 3\n"
        "[[ruleset.rule]]\nmatch = '/'\non = 'ANY'\nrun = 'true'\n",
        [
            "k.toml:3: uid must be a list of uids (integers), not ['root']",
            "k.toml:4: exclude_descendants_of takes pids or process names, not 0",
            "k.toml:5: unknown key 'pid' in process (allowed: uid, exclude_uid, comm, exclude_comm, exclude_descendants_of, "
            "exe, exclude_exe, auid, user, container, cgroup)",
        ],
    ),
    "toml both on/run and action tables": (
        "k.toml",
        "[[rule]]\nmatch = '/'\non = 'ANY'\nrun = 'true'\n[[rule.action]]\non = 'ANY'\nrun = 'true'\n",
        ["k.toml:1: a rule has either on/run/alert or [[...action]] tables, not both"],
    ),
    "toml replicate without target": ("k.toml", "[[replicate]]\ndelete = true\n", ["k.toml:1: a [[replicate]] table needs 'target' (a string)"]),
    "toml shell must be absolute": (
        "k.toml",
        "[runner]\nshell = 'sh'\n[[rule]]\nmatch = '/'\non = 'ANY'\nrun = 'true'\n",
        ["k.toml:2: shell must be an absolute path, not 'sh'"],
    ),
    "toml missing include": (
        "k.toml",
        "[[ruleset]]\nchangedfiles = 'nope.conf'\n",
        ["k.toml:2: cannot read {dir}/nope.conf: No such file or directory"],
    ),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_check_config_reports_every_error(case: str, tmp_path: Path) -> None:
    name, text, want = CASES[case]
    path = tmp_path / name
    path.write_text(text)
    got = [str(e) for e in check_config(path)]
    assert got == [f"{tmp_path}/{w.format(dir=tmp_path)}" for w in want]
    errors = [w for w in want if ": warning: " not in w]
    if errors:
        with pytest.raises(ConfigErrors) as ei:
            load_config(path)
        assert [str(e) for e in ei.value.errors] == got
    else:
        cfg = load_config(path)
        assert [str(w) for w in cfg.warnings] == got


def test_errors_inside_an_included_changedfiles_name_that_file(tmp_path: Path) -> None:
    (tmp_path / "old.conf").write_text("RULE ^/a\nUNLINK echo 'x\n")
    (tmp_path / "k.toml").write_text("[[ruleset]]\nchangedfiles = 'old.conf'\n[[ruleset.rule]]\nmatch = '('\non = 'ANY'\nrun = 'x'\n")
    assert [str(e) for e in check_config(tmp_path / "k.toml")] == [
        f"{tmp_path}/k.toml:4: bad regex '(': missing ), unterminated subpattern at position 0",
        f"{tmp_path}/old.conf:2: command: unterminated single quote (column 13)",
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    assert [str(e) for e in check_config(tmp_path / "missing.conf")] == [
        f"{tmp_path}/missing.conf: cannot read: No such file or directory"
    ]
