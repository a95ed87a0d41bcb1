"""Output specs (``[[output]]`` tables and ``--output`` strings) and alert rules in the TOML config. Pure."""

from __future__ import annotations

import pytest

from kwatch.events import Op
from kwatch.outputs.config import OutputSpec, parse_output, parse_output_option
from kwatch.rules import parse_config

GOOD_TABLES: dict[str, tuple[dict[str, object], dict[str, object]]] = {
    "file with defaults": ({"type": "file", "path": "/l/a.jsonl"},
                           {"name": "file:/l/a.jsonl", "max_bytes": 100 << 20, "keep": 10, "fsync": "interval"}),
    "file sizes with suffixes": ({"type": "file", "path": "/l/a", "max_bytes": "64M", "keep": 3, "fsync": "every"},
                                 {"max_bytes": 64 << 20, "keep": 3, "fsync": "every"}),
    "journal": ({"type": "journal"}, {"socket": "/run/systemd/journal/socket", "identifier": "kwatch"}),
    "nats": ({"type": "nats", "servers": ["nats://a:4222", "nats://b:4222"], "spool": "/s", "replicas": 3,
              "records": "alerts"},
             {"servers": ("nats://a:4222", "nats://b:4222"), "replicas": 3, "records": "alerts", "name": "nats:KWATCH"}),
}


@pytest.mark.parametrize("name", list(GOOD_TABLES))
def test_good_tables(name: str) -> None:
    table, want = GOOD_TABLES[name]
    spec, problems = parse_output(table)
    assert problems == [] and spec is not None
    for k, v in want.items():
        assert getattr(spec, k) == v, k


BAD_TABLES: dict[str, tuple[dict[str, object], str]] = {
    "no type": ({"path": "/x"}, "needs type"),
    "unknown type": ({"type": "syslog"}, "needs type"),
    "file without path": ({"type": "file"}, "needs 'path'"),
    "relative path": ({"type": "file", "path": "a.jsonl"}, "absolute path"),
    "bad fsync": ({"type": "file", "path": "/a", "fsync": "sometimes"}, "fsync must be"),
    "bad size": ({"type": "file", "path": "/a", "max_bytes": "lots"}, "max_bytes must be"),
    "unknown key": ({"type": "journal", "path": "/a"}, "unknown key 'path'"),
    "nats without spool": ({"type": "nats", "servers": "nats://a:1"}, "needs 'spool'"),
    "nats with an http URL": ({"type": "nats", "servers": "http://a", "spool": "/s"}, "servers must be"),
    "host with a dot": ({"type": "nats", "servers": "nats://a:1", "spool": "/s", "host": "a.b"}, "host must be"),
    "records": ({"type": "journal", "records": "some"}, "records must be"),
}


@pytest.mark.parametrize("name", list(BAD_TABLES))
def test_bad_tables(name: str) -> None:
    table, reason = BAD_TABLES[name]
    spec, problems = parse_output(table)
    assert spec is None and any(reason in p for p in problems), problems


OPTION_CASES: dict[str, tuple[str, dict[str, object]]] = {
    "file": ("file:/var/log/k.jsonl,max_bytes=10M,keep=3,fsync=none",
             {"kind": "file", "path": "/var/log/k.jsonl", "max_bytes": 10 << 20, "keep": 3, "fsync": "none"}),
    "journal bare": ("journal", {"kind": "journal", "socket": "/run/systemd/journal/socket"}),
    "journal socket": ("journal:/tmp/j.sock", {"socket": "/tmp/j.sock"}),
    "nats servers": ("nats:nats://a:4222,nats://b:4222,spool=/s,stream=AUDIT",
                     {"servers": ("nats://a:4222", "nats://b:4222"), "stream": "AUDIT", "spool": "/s"}),
}


@pytest.mark.parametrize("name", list(OPTION_CASES))
def test_output_option(name: str) -> None:
    text, want = OPTION_CASES[name]
    spec, problems = parse_output_option(text)
    assert problems == [] and isinstance(spec, OutputSpec)
    for k, v in want.items():
        assert getattr(spec, k) == v, k


TOML = """
[[rule]]
name = "shadow"
match = '^/etc/shadow$'
on = ["OPENW", "UNLINK"]
alert = "shadow changed"
level = "crit"

[[rule]]
match = '^/srv/in/'
on = ["CLOSEW"]
run = "echo _FILE_"
alert = "a file arrived"

[[output]]
type = "file"
path = "/var/log/kwatch/audit.jsonl"

[[output]]
type = "journal"
records = "alerts"
"""


def test_toml_alerts_and_outputs() -> None:
    cfg, errs = parse_config(TOML, "k.toml")
    assert cfg is not None, errs
    shadow, arrived = cfg.rulesets[0].rules
    assert shadow.actions == () and shadow.alerts[0].message == "shadow changed" and shadow.alerts[0].level == "crit"
    assert shadow.alerts[0].ops == frozenset({Op.CLOSE_WRITE, Op.UNLINK})
    assert len(arrived.actions) == 1 and arrived.alerts[0].level == "warning"
    assert [o.kind for o in cfg.outputs] == ["file", "journal"] and cfg.outputs[1].records == "alerts"
    assert Op.RENAME in cfg.ops, "OPENW in an alert also fires on a rename into place"


BAD_TOML: dict[str, tuple[str, str]] = {
    "alert without on": ("[[rule]]\nmatch = '^/a'\nalert = 'x'\n", "k.toml:3: an alert needs 'on'"),
    "bad level": ("[[rule]]\nmatch = '^/a'\non = ['UNLINK']\nalert = 'x'\nlevel = 'loud'\n", "k.toml:5: level must be"),
    "empty message": ("[[rule]]\nmatch = '^/a'\non = ['UNLINK']\nalert = ''\n", "k.toml:4: alert must be a message"),
    "bad output": ("[[rule]]\nmatch = '^/a'\non = ['UNLINK']\nalert = 'x'\n\n[[output]]\ntype = 'file'\n",
                   "k.toml:6: a file output needs 'path'"),
    "two outputs one name": ("[[rule]]\nmatch = '^/a'\non = ['UNLINK']\nalert = 'x'\n[[output]]\ntype = 'journal'\n"
                             "[[output]]\ntype = 'journal'\n", "k.toml:7: two outputs are named 'journal'"),
}


@pytest.mark.parametrize("name", list(BAD_TOML))
def test_bad_toml(name: str) -> None:
    text, want = BAD_TOML[name]
    cfg, errs = parse_config(text, "k.toml")
    assert cfg is None and any(str(e).startswith(want) for e in errs), [str(e) for e in errs]
