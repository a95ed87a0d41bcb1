"""``kwatch check-config`` (and ``kwatch run`` on a broken config): exit status and ``file:line: reason`` lines.

The command is run as a real process; a table of named configs gives the expected status and messages.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

KWATCH = [sys.executable, "-c", "import sys; from kwatch.cli import main; sys.exit(main())"]


def kwatch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KWATCH, *args], capture_output=True, text=True, timeout=60)


VERBATIM = r"""RULE ^/export/home/image-converter.*\.jpg$
OPENW  /usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png
RULE ^/home/mike/test
IGNORE \.Xauthority
UNLINK  ssh faustus rm -f /mirrors/otto_FILE_
RENAME  ... _OLD_FILE_ ... _NEW_FILE_
"""

# name -> (file name, text, exit status, expected lines on stderr as (line, text in the reason); line 0: none)
CASES: dict[str, tuple[str, str, int, list[tuple[int, str]]]] = {
    "good changedfiles": ("ok.conf", "RULE ^/srv/in/\nCLOSEW echo _FILE_\n", 0, []),
    "verbatim example: ssh warning only": (
        "changedfiles.conf",
        VERBATIM,
        0,
        [(5, "warning: ssh hands its arguments")],
    ),
    "unknown keyword": ("kw.conf", "RULE ^/a/\nFROB x\n", 1, [(2, "unknown keyword 'FROB'")]),
    "lower-case keyword hint": (
        "lc.conf",
        "RULE ^/a/\nopenw x\n",
        1,
        [(2, "keywords are upper case: OPENW")],
    ),
    "bad regex": ("re.conf", "RULE ^/a/(\nANY true\n", 1, [(1, "bad regex")]),
    "action before RULE": ("early.conf", "OPENW true\n", 1, [(1, "OPENW before the first RULE")]),
    "several errors, all reported in line order": (
        "many.conf",
        "RULE ^/a/\nFROB x\nRULE [\nUNLINK echo $((_FILE_))\n",
        1,
        [(2, "unknown keyword"), (3, "bad regex"), (4, "")],
    ),
    "toml: good": ("ok.toml", "[[rule]]\nmatch = '^/srv/'\non = ['CLOSEW']\nrun = 'echo _FILE_'\n", 0, []),
    "toml: unknown key": (
        "bad.toml",
        "[[rule]]\nmatch = '^/srv/'\non = ['CLOSEW']\nrun = 'echo _FILE_'\nfrobnicate = 1\n",
        1,
        [(5, "frobnicate")],
    ),
    "toml: syntax error": ("syntax.toml", "[[rule]\nmatch = 1\n", 1, [(1, "")]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_check_config_table(case: str, tmp_path: Path) -> None:
    name, text, status, expected = CASES[case]
    path = tmp_path / name
    path.write_text(text)
    r = kwatch("check-config", str(path))
    assert r.returncode == status, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    for line, text_part in expected:
        assert any(x.startswith(f"{path}:{line}: ") and text_part in x for x in lines), (
            line,
            text_part,
            lines,
        )
    if status == 0:
        assert r.stdout.startswith(f"{path}: ok: ")
        assert "rule(s)" in r.stdout and "captures" in r.stdout
    else:
        assert r.stdout == ""
        assert lines[-1].startswith(f"{path}: ") and "error(s)" in lines[-1]
    # every line but the summary names the file and a line
    for x in lines[:-1] if status else lines:
        assert x.startswith(f"{path}:"), x


def test_check_config_summary_names_the_capture_roots(tmp_path: Path) -> None:
    path = tmp_path / "c.conf"
    path.write_text(VERBATIM)
    r = kwatch("check-config", str(path))
    assert r.returncode == 0
    assert "2 rule(s), 3 action(s), 1 warning(s)" in r.stdout
    assert "close_write,rename,unlink under /export/home, /home/mike" in r.stdout
    path.write_text("RULE \\.jpg$\nCLOSEW true\n")
    assert "under the whole system" in kwatch("check-config", str(path)).stdout


def test_check_config_missing_file(tmp_path: Path) -> None:
    r = kwatch("check-config", str(tmp_path / "nope.conf"))
    assert r.returncode == 1
    assert f"{tmp_path / 'nope.conf'}: cannot read: No such file or directory" in r.stderr


def test_check_config_default() -> None:
    r = kwatch("check-config")
    assert r.returncode == 0
    assert r.stdout.startswith("<kwatch>/default.conf: ok: ")
    assert "/tmp" in r.stdout


def test_run_refuses_a_broken_config(tmp_path: Path) -> None:
    """The daemon stops before touching the kernel: same file:line messages, exit status 1."""
    path = tmp_path / "broken.conf"
    path.write_text("RULE ^/a/\nFROB x\n")
    r = kwatch("run", "-c", str(path), "--no-metrics")
    assert r.returncode == 1
    assert f"{path}:2: unknown keyword 'FROB'" in r.stderr
    assert "event=config_invalid" in r.stderr
