"""One options schema (kwatch.replicate.options) behind the CLI, the config formats and the daemon's sink."""

from __future__ import annotations

import argparse

import pytest

from kwatch.replicate import options as schema
from kwatch.replicate.command import add_commands
from kwatch.rules.changedfiles import parse_changedfiles
from kwatch.rules.tomlconf import parse_toml


def replicate_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_commands(p.add_subparsers())
    return p


def test_cli_defaults_are_the_options_defaults() -> None:
    args = replicate_parser().parse_args(["replicate", "/src", "/dst"])
    assert schema.from_args(args) == schema.TargetOptions()


# the same settings said three ways: CLI flags, a TOML table, a changedfiles line
SAME = [
    (["--no-delete"], "delete = false", "delete=off"),
    (["--exclude", "*.tmp", "--exclude", "/build"], 'exclude = ["*.tmp", "/build"]', "exclude=*.tmp exclude=/build"),
    (["--settle", "0.5", "--max-delay", "3"], "settle = 0.5\nmax_delay = 3", "settle=0.5 max_delay=3"),
    (["--eager", "0"], "eager = 0", "eager=0"),
    (["--bwlimit", "100"], "bwlimit = 100", "bwlimit=100"),
    (["--no-compress", "--checksum", "--owner"], "compress = false\nchecksum = true\nowner = true",
     "compress=off checksum=on owner=on"),
    (["--fsync", "batch"], 'fsync = "batch"', "fsync=batch"),
    (["-e", "ssh -p 2222"], 'ssh = "ssh -p 2222"', "'ssh=ssh -p 2222'"),
    (["--agent-command", "/opt/kwatch"], 'agent_command = "/opt/kwatch"', "agent_command=/opt/kwatch"),
    (["--password-file", "/etc/pw"], 'password_file = "/etc/pw"', "password_file=/etc/pw"),
]


@pytest.mark.parametrize(("flags", "toml", "line"), SAME, ids=[s[2] for s in SAME])
def test_cli_toml_and_changedfiles_agree(flags: list[str], toml: str, line: str) -> None:
    cli = schema.from_args(replicate_parser().parse_args(["replicate", *flags, "/src", "/dst"]))
    cfg, errs = parse_toml(f'[[replicate]]\nsource = "/srv"\ntarget = "/m"\n{toml}\n', "r.toml")
    assert cfg is not None, errs
    rs, errs2 = parse_changedfiles(f"RULE ^/srv(/|$)\nREPLICATE /m {line}\n", "c.conf")
    assert rs is not None, errs2
    assert schema.build(cfg.replicate[0].options) == cli == schema.build(rs.replicate[0].options)
    assert cli != schema.TargetOptions()


def test_every_option_is_a_flag_or_config_only() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    add_commands(sub)
    text = sub.choices["replicate"].format_help()
    for o in schema.OPTIONS:
        flag = "--" + ("no-" if o.kind == "bool" and o.default else "") + o.key.replace("_", "-")
        assert (flag in text) is o.cli, o.key
