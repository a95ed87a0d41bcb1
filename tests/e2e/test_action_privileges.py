"""Privileges of actions, with real processes: ``user``/``group`` applied in the child before exec, a clean
environment (never the daemon's secrets), and config, include and password files that others could change (or
read) refused with the file and the fix."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kwatch.actions.runner import Result, Runner
from kwatch.events import FileEvent, Op
from kwatch.rules import Config, check_config, load_config, parse_config
from kwatch.rules.match import match_config
from kwatch.rules.tomlconf import parse_toml

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
NOBODY = 65534
DAEMON_GID = 1  # Debian's "daemon" group


def _config(text: str) -> Config:
    cfg, errs = parse_config(text, "priv.toml", toml=True)
    assert cfg is not None, errs
    return cfg


def _run(cfg: Config, env: dict[bytes, bytes] | None = None) -> list[Result]:
    runner = Runner.from_config(cfg, stdout="capture", env=env)
    try:
        runner.submit_all(match_config(cfg, FileEvent(Op.CLOSE_WRITE, b"/w/a b", pid=1)))
        results: list[Result] = []
        end = time.monotonic() + 60  # only turns a hang into a failure
        while not runner.idle or not results:
            results.extend(runner.run_until_idle(0.05))
            assert time.monotonic() < end, "the actions did not finish"
        return results
    finally:
        runner.close()


ID = "id -u; id -g; id -G"

# (config text, expected "uid\ngid\ngroups" of the action; None: as the daemon, root)
CREDENTIALS: dict[str, tuple[str, str | None]] = {
    "default user": (f'[defaults]\nuser = "nobody"\n[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nrun = "{ID}"\n',
                     f"{NOBODY}\n{NOBODY}\n{NOBODY}\n"),
    "rule user by uid": (f'[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nuser = {NOBODY}\nrun = "{ID}"\n',
                         f"{NOBODY}\n{NOBODY}\n{NOBODY}\n"),
    "action user and group": (
        f'[defaults]\nuser = "root"\n[[rule]]\nmatch = "^/w/"\n[[rule.action]]\non = ["CLOSEW"]\n'
        f'user = "nobody"\ngroup = "daemon"\nrun = "{ID}"\n',
        f"{NOBODY}\n{DAEMON_GID}\n{DAEMON_GID}\n",  # initgroups(nobody, daemon): no root group left over
    ),
    "group only": (f'[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\ngroup = "daemon"\nrun = "{ID}"\n',
                   None),  # root with gid daemon, keeping the daemon's supplementary groups
    "ruleset user": (
        f'[[ruleset]]\nuser = "nobody"\n[[ruleset.rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nrun = "{ID}"\n',
        f"{NOBODY}\n{NOBODY}\n{NOBODY}\n",
    ),
    "no user": (f'[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nrun = "{ID}"\n', "0\n0\n0\n"),
}


@root_only
@pytest.mark.parametrize("case", list(CREDENTIALS), ids=list(CREDENTIALS))
def test_action_credentials(case: str) -> None:
    text, want = CREDENTIALS[case]
    if want is None:
        groups = " ".join(str(g) for g in [DAEMON_GID, *(g for g in os.getgroups() if g != DAEMON_GID)])
        want = f"0\n{DAEMON_GID}\n{groups}\n"
    (res,) = _run(_config(text))
    assert res.ok, (res.error, res.stderr)
    assert res.stdout.decode() == want


@root_only
def test_included_changedfiles_takes_the_ruleset_user(tmp_path: Path) -> None:
    (tmp_path / "legacy.conf").write_text("RULE ^/w/\nCLOSEW id -u\n")
    main = tmp_path / "k.toml"
    main.write_text('[[ruleset]]\nchangedfiles = "legacy.conf"\nuser = "nobody"\n')
    (res,) = _run(load_config(main))
    assert res.stdout == f"{NOBODY}\n".encode()


@root_only
def test_environment_is_an_allowlist(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in {"RSYNC_PASSWORD": "secret", "SSH_AUTH_SOCK": "/s", "AWS_SECRET": "x", "LC_TIME": "C",
                 "LANG": "C.UTF-8", "TZ": "UTC", "KWATCH_FILE": "stale", "HOME": "/root"}.items():
        monkeypatch.setenv(k, v)
    cfg = _config('[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nuser = "nobody"\nrun = "env -0"\n')
    (res,) = _run(cfg)  # env None: what the daemon does, the allowlisted part of its own environment
    env = dict(item.split(b"=", 1) for item in res.stdout.split(b"\0") if item)
    assert b"RSYNC_PASSWORD" not in env and b"SSH_AUTH_SOCK" not in env and b"AWS_SECRET" not in env
    assert (env[b"HOME"], env[b"USER"], env[b"LOGNAME"]) == (b"/nonexistent", b"nobody", b"nobody")
    assert (env[b"LC_TIME"], env[b"LANG"], env[b"TZ"]) == (b"C", b"C.UTF-8", b"UTC")
    assert env[b"KWATCH_FILE"] == b"/w/a b" and env[b"KWATCH_OP"] == b"close_write"
    assert env[b"PATH"]
    assert set(env) - {b"PATH", b"HOME", b"USER", b"LOGNAME", b"LC_TIME", b"LANG", b"TZ", b"TERM", b"PWD", b"SHLVL", b"_"} <= {
        k for k in env if k.startswith(b"KWATCH_")
    }


def test_environment_without_user_keeps_the_daemons_home(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RSYNC_PASSWORD", "secret")
    monkeypatch.setenv("HOME", "/home/kw")
    monkeypatch.delenv("PATH")
    cfg = _config('[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nrun = "true"\n')
    spec = Runner(dry_run=True).plan(match_config(cfg, FileEvent(Op.CLOSE_WRITE, b"/w/x"))[0])
    assert b"RSYNC_PASSWORD" not in spec.env
    assert spec.env[b"HOME"] == b"/home/kw"
    assert spec.env[b"PATH"] == b"/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


TOML_ERRORS = {
    "user not a name": ('[defaults]\nuser = ["a"]\n', "user must be a user name or a numeric id, not ['a']"),
    "negative uid": ('[defaults]\nuser = -1\n', "user must be a user name or a numeric id, not -1"),
    "group with colon": ('[defaults]\ngroup = "a:b"\n', "group must be a group name or a numeric id, not 'a:b'"),
}


@pytest.mark.parametrize("case", list(TOML_ERRORS), ids=list(TOML_ERRORS))
def test_bad_user_or_group_values(case: str) -> None:
    text, reason = TOML_ERRORS[case]
    cfg, errs = parse_toml(text + '[[rule]]\nmatch = "^/"\non = ["CLOSEW"]\nrun = "true"\n', "b.toml")
    assert cfg is None
    assert [e.reason for e in errs] == [reason]


@pytest.fixture
def confdir() -> Iterator[Path]:
    """A directory others can traverse (tmp_path is 0700): /tmp/kwatch-priv-XXXX, mode 0755, owned by root."""
    d = Path(tempfile.mkdtemp(prefix="kwatch-priv-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def _write(path: Path, text: str, mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


RULE = '[[rule]]\nmatch = "^/w/"\non = ["CLOSEW"]\nrun = "true"\n'


def test_unknown_user_is_a_config_error(confdir: Path) -> None:
    p = _write(confdir / "k.toml", '[defaults]\nuser = "no-such-user-kw"\n' + RULE)
    assert [str(e) for e in check_config(p)] == [f"{p}:6: unknown user 'no-such-user-kw' (user/group of this action)"]


@root_only
def test_a_daemon_that_is_not_root_refuses_another_user(confdir: Path) -> None:
    p = _write(confdir / "k.toml", '[defaults]\nuser = "root"\n' + RULE)
    code = (
        # everything is imported first: the interpreter's own files may not be readable by nobody
        "import os, sys\nfrom kwatch.rules import check_config\nos.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "print('\\n'.join(str(e) for e in check_config(sys.argv[1])))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.stdout.strip() == (
        f"{p}:6: kwatch runs as uid {NOBODY} and cannot start actions as uid 0 (only root can): run kwatch as root, "
        "or drop user/group"
    ), r.stderr
    # its own user is fine: nothing to switch
    _write(p, '[defaults]\nuser = "nobody"\ngroup = "nogroup"\n' + RULE)
    r = subprocess.run([sys.executable, "-c", code, str(p)], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.stdout.strip() == "", r.stderr


@root_only
def test_config_files_others_can_change_are_refused(confdir: Path) -> None:
    p = _write(confdir / "k.toml", RULE, 0o666)
    assert [str(e) for e in check_config(p)] == [
        f"{p}: refusing to load {p} can be changed by every user (mode 0666); fix: chmod go-w {p}"
    ]
    p.chmod(0o664)
    os.chown(p, 0, DAEMON_GID)
    assert [str(e) for e in check_config(p)] == [
        f"{p}: refusing to load {p} can be changed by group {DAEMON_GID} (mode 0664); fix: chmod go-w {p}"
    ]
    p.chmod(0o644)
    os.chown(p, NOBODY, 0)
    assert [str(e) for e in check_config(p)] == [
        f"{p}: refusing to load {p} can be changed by its owner, uid {NOBODY} (mode 0644); fix: chown root {p}"
    ]
    os.chown(p, 0, 0)
    assert check_config(p) == []
    confdir.chmod(0o777)  # not sticky: anyone could rename k.toml away and put their own
    assert [str(e) for e in check_config(p)] == [
        f"{p}: refusing to load {p}: the directory {confdir} can be changed by every user, who could replace the "
        f"file; fix: chmod go-w {confdir}"
    ]
    with pytest.raises(Exception, match="can be changed by every user"):
        load_config(p)


@root_only
def test_an_include_others_can_change_is_refused(confdir: Path) -> None:
    legacy = _write(confdir / "legacy.conf", "RULE ^/w/\nCLOSEW true\n", 0o646)
    p = _write(confdir / "k.toml", '[[ruleset]]\nchangedfiles = "legacy.conf"\n')
    assert [str(e) for e in check_config(p)] == [
        f"{p}:2: refusing to include {legacy} can be changed by every user (mode 0646); fix: chmod go-w {legacy}"
    ]
    legacy.chmod(0o644)
    assert check_config(p) == []


@root_only
@pytest.mark.parametrize(
    ("mode", "gid", "problem"),
    [
        (0o600, 0, None),
        (0o640, DAEMON_GID, None),  # group access is the admin's choice, as with rsync
        (0o604, 0, "can be read by every user (mode 0604); fix: chmod o-rwx {pw}"),
        (0o620, DAEMON_GID, "can be changed by group 1 (mode 0620); fix: chmod go-w {pw}"),
    ],
    ids=["private", "group readable", "world readable", "group writable"],
)
def test_password_files(confdir: Path, mode: int, gid: int, problem: str | None) -> None:
    pw = _write(confdir / "rsync.pw", "secret\n", mode)
    os.chown(pw, 0, gid)
    p = _write(confdir / "k.toml", f'[[replicate]]\nsource = "/srv"\ntarget = "rsync://h/m"\npassword_file = "{pw}"\n')
    got = [str(e) for e in check_config(p)]
    assert got == ([] if problem is None else [f"{p}:1: password_file: {pw} " + problem.format(pw=pw)])
    kwatch = str(Path(sys.executable).parent / "kwatch")
    src = confdir / "src"
    src.mkdir(exist_ok=True)
    if problem is not None:  # the command line refuses it before connecting anywhere
        r = subprocess.run([kwatch, "replicate", "--once", "--password-file", str(pw), str(src), "rsync://127.0.0.1:1/m"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode != 0 and f"--password-file: {pw} " + problem.format(pw=pw) in r.stderr


def test_a_missing_password_file_is_a_config_error(confdir: Path) -> None:
    p = _write(confdir / "k.toml", f'[[replicate]]\nsource = "/srv"\ntarget = "rsync://h/m"\npassword_file = "{confdir}/none"\n')
    assert [str(e) for e in check_config(p)] == [
        f"{p}:1: password_file: cannot read the password file {confdir}/none: No such file or directory"
    ]
