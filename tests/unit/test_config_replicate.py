"""Replication targets in both config formats: the REPLICATE line in changedfiles and [[replicate]] in TOML."""

from __future__ import annotations

import pytest

from kwatch.rules.changedfiles import parse_changedfiles
from kwatch.rules.tomlconf import parse_toml

GOOD = [
    ("whole_directory_rule", "RULE ^/srv/data(/|$)\nREPLICATE backup:/srv/data\n",
     "backup:/srv/data", {"source": "/srv/data"}),
    ("trailing_slash_rule", "RULE ^/srv/in/\nREPLICATE /mnt/m delete=off settle=0.5 exclude=*.tmp exclude='a b'\n",
     "/mnt/m", {"source": "/srv/in", "delete": False, "settle": 0.5, "exclude": ["*.tmp", "a b"]}),
    ("rsync_target_with_options", "RULE ^/srv/x$\nREPLICATE rsync://h/mod/x bwlimit=100 checksum=yes\n",
     "rsync://h/mod/x", {"source": "/srv/x", "bwlimit": 100, "checksum": True}),
]


@pytest.mark.parametrize(("name", "text", "target", "options"), GOOD, ids=[g[0] for g in GOOD])
def test_replicate_line(name: str, text: str, target: str, options: dict[str, object]) -> None:
    rs, errs = parse_changedfiles(text, "c.conf")
    assert errs == []
    assert rs is not None
    (t,) = rs.replicate
    assert (t.target, t.options, t.where.line) == (target, options, 2)


BAD = [
    ("before_rule", "REPLICATE /m\n", "c.conf:1: REPLICATE before the first RULE"),
    ("rule_not_a_directory", "RULE ^/srv/da\nREPLICATE /m\n",
     "c.conf:2: REPLICATE needs a RULE that names a whole directory, like ^/srv/data(/|$); '^/srv/da' does not"),
    ("unanchored_rule", "RULE \\.jpg$\nREPLICATE /m\n",
     "c.conf:2: REPLICATE needs a RULE that names a whole directory, like ^/srv/data(/|$); '\\\\.jpg$' does not"),
    ("bad_bool", "RULE ^/s/\nREPLICATE /m delete=maybe\n", "c.conf:2: delete must be on or off, not 'maybe'"),
    ("not_key_value", "RULE ^/s/\nREPLICATE /m fast\n", "c.conf:2: REPLICATE option 'fast' is not key=value"),
    ("unknown_option", "RULE ^/s/\nREPLICATE /m speed=9\n", "c.conf:2: unknown replicate option 'speed'; known: "
     "delete, compress, checksum, owner, settle, max_delay, eager, bwlimit, source, ssh, agent_command, password_file, "
     "ahead, fsync, exclude"),
    ("bad_target", "RULE ^/s/\nREPLICATE relative/path\n", "c.conf:2: target 'relative/path': expected /local/path, "
     "[user@]host:/path, ssh://[user@]host[:port]/path or rsync://host/module/path"),
    ("bad_fsync", "RULE ^/s/\nREPLICATE /m fsync=always\n", "c.conf:2: fsync must be none, file or batch"),
]


@pytest.mark.parametrize(("name", "text", "message"), BAD, ids=[b[0] for b in BAD])
def test_replicate_line_errors(name: str, text: str, message: str) -> None:
    rs, errs = parse_changedfiles(text, "c.conf")
    assert rs is None
    assert [str(e) for e in errs] == [message]


TOML_BAD = [
    ("no_source", '[[replicate]]\ntarget = "/m"\n', "a replication target needs 'source' (the tree to replicate)"),
    ("relative_source", '[[replicate]]\ntarget = "/m"\nsource = "x"\n', "source 'x' must be an absolute path"),
    ("delete_not_bool", '[[replicate]]\ntarget = "/m"\nsource = "/s"\ndelete = "yes"\n', "delete must be true or false"),
    ("negative_settle", '[[replicate]]\ntarget = "/m"\nsource = "/s"\nsettle = -1\n',
     "settle must be a number of seconds >= 0"),
]


@pytest.mark.parametrize(("name", "text", "reason"), TOML_BAD, ids=[b[0] for b in TOML_BAD])
def test_toml_replicate_errors(name: str, text: str, reason: str) -> None:
    cfg, errs = parse_toml(text, "r.toml")
    assert cfg is None
    assert [e.reason for e in errs] == [reason]
    assert all(e.line == 1 for e in errs)


OPTION_CASES = [
    ("defaults", {}, {"eager": 0.2, "settle": 0.05, "max_delay": 1.0, "bwlimit": None, "delete": True}),
    ("eager_off", {"eager": 0.0}, {"eager": None}),
    ("eager_set", {"eager": 0.5}, {"eager": 0.5}),
    ("bwlimit_in_kib", {"bwlimit": 100}, {"bwlimit": 102400}),
    ("excludes_as_bytes", {"exclude": ["*.tmp"]}, {"excludes": (b"*.tmp",)}),
]


@pytest.mark.parametrize(("opts", "want"), [(c[1], c[2]) for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_options_from_config(opts: dict[str, object], want: dict[str, object]) -> None:
    from kwatch.replicate.options import build as options_from_config

    t = options_from_config(opts)
    assert {k: getattr(t, k) for k in want} == want
