"""A replication target's host reaches ssh as the destination, never as an option: a host starting with '-' is refused
when the target is parsed (command line and both config formats), and ``--`` stands before the host in every ssh argv
kwatch builds. The end-to-end case runs the real command line: with the old argv, ssh ran ``-oProxyCommand=...``."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from livereplicate import KWATCH

from kwatch.replicate.engine import Target, TargetOptions
from kwatch.replicate.rsync_transport import parse_url
from kwatch.rules.changedfiles import parse_changedfiles
from kwatch.rules.tomlconf import parse_toml

HOSTILE = {
    "host:path form": "-oProxyCommand=touch canary:/m",
    "user@ in host:path form": "-oProxyCommand=touch canary@h:/m",
    "ssh url": "ssh://-oProxyCommand=x/m",
    "ssh url user": "ssh://-oProxyCommand=x@h/m",
}


@pytest.mark.parametrize("spec", list(HOSTILE.values()), ids=list(HOSTILE))
def test_target_parse_refuses_leading_dash(spec: str) -> None:
    with pytest.raises(ValueError, match="cannot start with '-'"):
        Target.parse(spec)


@pytest.mark.parametrize("url", ["ssh://-oProxyCommand=x/m", "ssh://-oX@h/m", "rsync://-oX/mod"],
                         ids=["host", "user", "rsync host"])
def test_rsync_url_refuses_leading_dash(url: str) -> None:
    with pytest.raises(ValueError, match="cannot start with '-'"):
        parse_url(url)


@pytest.mark.parametrize("target", ["-oProxyCommand=x:/m", "ssh://-oProxyCommand=x/m", "rsync://-x/mod"],
                         ids=["host:path", "ssh url", "rsync url"])
def test_config_refuses_leading_dash(target: str) -> None:
    rs, errs = parse_changedfiles(f"RULE ^/srv/d(/|$)\nREPLICATE {target}\n", "c.conf")
    assert rs is None
    assert [str(e) for e in errs] == [
        f"c.conf:2: target {target!r}: a host cannot start with '-' (ssh would read it as an option)"
    ]
    cfg, terrs = parse_toml(f'[[replicate]]\nsource = "/srv/d"\ntarget = "{target}"\n', "r.toml")
    assert cfg is None
    assert [e.reason for e in terrs] == [f"target {target!r}: a host cannot start with '-' (ssh would read it as an option)"]


@pytest.mark.parametrize("spec", ["backup:/m", "u@backup:/m", "ssh://u@backup:2222/m"], ids=["host", "user", "url"])
def test_double_dash_before_the_host(spec: str) -> None:
    t = Target.parse(spec)
    argv = t.agent_argv(TargetOptions(ssh="ssh -i key -o Foo=bar"))
    i = argv.index("--")
    assert argv[i + 1] == t.host and i + 2 == len(argv) - 1  # then only the remote command


def test_a_hand_built_target_still_gets_double_dash() -> None:
    argv = Target("x", "ssh", b"/m", "-oProxyCommand=x").agent_argv(TargetOptions())
    assert argv[argv.index("-oProxyCommand=x") - 1] == "--"


def test_command_line_refuses_and_runs_nothing(tmp_path: Path) -> None:
    canary = tmp_path / "canary"
    src = tmp_path / "src"
    src.mkdir()
    # no "/" in the host part (that is refused as a malformed target anyway): the command runs in ssh's cwd
    target = "-oProxyCommand=touch canary:/m"
    argv = [KWATCH, "replicate", "--once", "-e", "ssh -o BatchMode=yes", "--", str(src), target]
    try:
        proc = subprocess.run(argv, capture_output=True, timeout=60, cwd=tmp_path,
                              env={**os.environ, "HOME": str(tmp_path)})
    except subprocess.TimeoutExpired:
        pytest.fail(f"the target was not refused (it kept retrying); ssh ran the ProxyCommand: {canary.exists()}")
    assert proc.returncode != 0
    assert b"cannot start with '-'" in proc.stderr
    assert not canary.exists(), "ssh ran the target's ProxyCommand"
