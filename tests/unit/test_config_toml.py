"""The TOML format: the same model as changedfiles, plus rule sets, process filters, options and [[replicate]]."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from test_config_changedfiles import MATCHES, VERBATIM

from kwatch.events import FileEvent, Op
from kwatch.rules import ActionOptions, BatchMode, ProcessFilter, load_config, parse_config
from kwatch.rules.match import match_config, match_ruleset
from kwatch.rules.procfs import ProcFS

SAME_AS_VERBATIM = r"""
[[ruleset]]
name = "legacy"

[[ruleset.rule]]
match = '^/export/home/image-converter.*\.jpg$'
on = ["OPENW"]
run = "/usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png"

[[ruleset.rule]]
match = "^/home/mike/test"
ignore = ['\.Xauthority']

[[ruleset.rule.action]]
on = ["UNLINK"]
run = "ssh faustus rm -f /mirrors/otto_QFILE_"

[[ruleset.rule.action]]
on = "rename"
run = "... _OLD_FILE_ ... _NEW_FILE_"
"""


@pytest.mark.parametrize("case", list(MATCHES), ids=list(MATCHES))
def test_same_matches_as_changedfiles(case: str) -> None:
    legacy, _ = parse_config(VERBATIM, "changedfiles.conf")
    modern, errs = parse_config(SAME_AS_VERBATIM, "kwatch.toml")
    assert legacy is not None and modern is not None, errs
    assert errs == []  # _QFILE_ for ssh: no warning
    ev = MATCHES[case][0]

    def view(cfg: object) -> list[tuple[tuple[str, ...], bytes, bytes, bytes]]:
        return [(m.action.triggers, m.file, m.old_file, m.new_file) for m in match_config(cfg, ev)]

    assert view(modern) == view(legacy)


FULL = r"""
[runner]
max_concurrency = 3
shell = "/bin/bash"

[defaults]
debounce = 0.25
timeout = 30
concurrency = 2

[[ruleset]]
name = "images"
[ruleset.process]
uid = [1000, 1001]
comm = ["cp", "a-very-long-process-name"]
exclude_descendants_of = ["rsync", 4242]

[[ruleset.rule]]
name = "convert"
match = '\.jpg$'
on = ["OPENW", "op:open_write"]
run = "convert _FILE_ _FILE_.png"
debounce = 1.5
debounce_max = 4
concurrency = 1
retrigger = true

[[ruleset.rule]]
match = '^/srv/drop/'
[[ruleset.rule.action]]
on = ["CREATE", "CLOSEW"]
run = "tar -rf /tmp/drop.tar _FILES_"
batch = "args"
batch_window = 2
batch_max = 100
[[ruleset.rule.action]]
on = ["UNLINK"]
run = "xargs -0 rm -f --"
batch = "stdin"
timeout = 0

[[rule]]
match = "^/tmp/top"
on = "ANY"
run = "true"

[[replicate]]
target = "ssh://mirror/srv"
source = "/srv"
delete = true
exclude = ["*.tmp"]
"""


def test_full_schema() -> None:
    cfg, errs = parse_config(FULL, "full.toml")
    assert cfg is not None, errs
    assert errs == []
    assert (cfg.max_concurrency, cfg.shell) == (3, "/bin/bash")
    assert [rs.name for rs in cfg.rulesets] == ["default", "images"]
    top, images = cfg.rulesets
    assert top.rules[0].actions[0].options == ActionOptions(debounce=0.25, timeout=30.0)
    assert images.process == ProcessFilter(
        uids=frozenset({1000, 1001}),
        comms=frozenset({b"cp", b"a-very-long-pro"}),
        exclude_descendants_of=(b"rsync", 4242),
    )
    conv, drop = images.rules
    assert (conv.name, conv.concurrency, conv.where.line) == ("convert", 1, 18)
    (a,) = conv.actions
    assert a.ops == {Op.CLOSE_WRITE, Op.OPEN_WRITE}
    assert a.options == ActionOptions(debounce=1.5, debounce_max=4.0, timeout=30.0, retrigger=True)
    assert drop.concurrency == 2
    tar, rm = drop.actions
    assert tar.options.batch is BatchMode.ARGS and (tar.options.batch_window, tar.options.batch_max) == (2.0, 100)
    assert tar.ops == {Op.CREATE, Op.CLOSE_WRITE}
    assert tar.where.line == 32  # the line of its run key
    assert rm.options.batch is BatchMode.STDIN and rm.options.timeout is None
    (rep,) = cfg.replicate
    assert (rep.target, rep.options, rep.where.line) == ("ssh://mirror/srv", {"source": "/srv", "delete": True, "exclude": ["*.tmp"]}, 47)


class FakeTree:
    def __init__(self, chains: dict[int, list[tuple[int, bytes]]]) -> None:
        self.chains = chains

    def ancestry(self, pid: int) -> Sequence[tuple[int, bytes]]:
        return self.chains.get(pid, [])


TREE = FakeTree(
    {
        10: [(10, b"cp"), (9, b"bash"), (1, b"init")],
        11: [(11, b"cp"), (8, b"rsync"), (1, b"init")],
        12: [(12, b"cp"), (4242, b"sshd"), (1, b"init")],
        13: [(13, b"a-very-long-pro"), (1, b"init")],
    }
)

# (event fields, matches the "images" rule set)
PROCESS_CASES: dict[str, tuple[dict[str, object], bool]] = {
    "allowed uid and comm": ({"pid": 10, "uid": 1000, "comm": b"cp"}, True),
    "other uid": ({"pid": 10, "uid": 0, "comm": b"cp"}, False),
    "unknown uid (inotify)": ({"pid": None, "uid": None, "comm": None}, False),
    "other comm": ({"pid": 10, "uid": 1000, "comm": b"mv"}, False),
    "long comm cut to 15 bytes": ({"pid": 13, "uid": 1000, "comm": b"a-very-long-pro"}, True),
    "descendant of rsync": ({"pid": 11, "uid": 1000, "comm": b"cp"}, False),
    "descendant of pid 4242": ({"pid": 12, "uid": 1000, "comm": b"cp"}, False),
    "gone process, own pid listed": ({"pid": 4242, "uid": 1000, "comm": b"cp"}, False),
}


@pytest.mark.parametrize("case", list(PROCESS_CASES), ids=list(PROCESS_CASES))
def test_process_filter(case: str) -> None:
    cfg, _ = parse_config(FULL, "full.toml")
    assert cfg is not None
    fields, want = PROCESS_CASES[case]
    ev = FileEvent(Op.CLOSE_WRITE, b"/x/a.jpg", **fields)  # type: ignore[arg-type]
    assert bool(match_ruleset(cfg.rulesets[1], ev, TREE)) is want


def test_exclude_filters() -> None:
    text = '[[ruleset]]\n[ruleset.process]\nexclude_uid = [0]\nexclude_comm = ["backup"]\n[[ruleset.rule]]\nmatch = "/"\non = "ANY"\nrun = "true"\n'
    cfg, errs = parse_config(text, "x.toml")
    assert cfg is not None, errs
    ok = FileEvent(Op.UNLINK, b"/a", uid=1000, comm=b"rm")
    assert match_config(cfg, ok)
    assert not match_config(cfg, FileEvent(Op.UNLINK, b"/a", uid=0, comm=b"rm"))
    assert not match_config(cfg, FileEvent(Op.UNLINK, b"/a", uid=5, comm=b"backup"))
    assert match_config(cfg, FileEvent(Op.UNLINK, b"/a"))  # nothing known: exclude filters cannot drop it


def test_procfs_ancestry_of_this_process() -> None:
    chain = ProcFS().ancestry(os.getpid())
    assert chain[0][0] == os.getpid()
    assert chain[1][0] == os.getppid()
    assert chain[-1][0] == 1 or len(chain) == 64
    assert ProcFS().ancestry(2**22 + 12345) == []


def test_include_changedfiles(tmp_path: Path) -> None:
    (tmp_path / "legacy.conf").write_text(VERBATIM)
    (tmp_path / "k.toml").write_text(
        '[defaults]\ndebounce = 2\n[[ruleset]]\nname = "mike"\nchangedfiles = "legacy.conf"\n'
        '[ruleset.process]\nuid = [1000]\n[[ruleset.rule]]\nmatch = "^/z"\non = "UNLINK"\nrun = "true"\n'
    )
    cfg = load_config(tmp_path / "k.toml")
    (rs,) = cfg.rulesets
    assert [r.where for r in rs.rules][:2] == [r.where for r in parse_config(VERBATIM, str(tmp_path / "legacy.conf"))[0].rulesets[0].rules]  # type: ignore[union-attr]
    assert len(rs.rules) == 3
    assert rs.rules[0].actions[0].options.debounce == 2.0  # TOML defaults reach included rules
    assert cfg.files == (str(tmp_path / "k.toml"), str(tmp_path / "legacy.conf"))
    assert [str(w) for w in cfg.warnings] == [f"{tmp_path}/legacy.conf:5: warning: " + cfg.warnings[0].reason]
    assert match_ruleset(rs, FileEvent(Op.UNLINK, b"/home/mike/test/a", uid=1000))
    assert not match_ruleset(rs, FileEvent(Op.UNLINK, b"/home/mike/test/a", uid=0))


def test_format_detection(tmp_path: Path) -> None:
    p = tmp_path / "kwatch.conf"
    p.write_text('# comment\n[[rule]]\nmatch = "/"\non = "ANY"\nrun = "true"\n')
    assert load_config(p).rulesets[0].name == "default"
    p.write_text(VERBATIM)
    assert load_config(p).rulesets[0].name == "kwatch.conf"


def test_replicate_only() -> None:
    cfg, errs = parse_config('[[replicate]]\ntarget = "/mnt/mirror"\nsource = "/srv"\n', "r.toml")
    assert cfg is not None and errs == []
    assert cfg.rulesets == () and cfg.replicate[0].target == "/mnt/mirror"


def test_multiline_command() -> None:
    text = "[[rule]]\nmatch = '/'\non = 'UNLINK'\nrun = '''\nlogger -t kwatch <<EOF\nremoved _FILE_\nEOF\n'''\n"
    cfg, errs = parse_config(text, "m.toml")
    assert cfg is not None, errs
    assert cfg.rulesets[0].rules[0].actions[0].command.script == "logger -t kwatch <<EOF\nremoved ${KWATCH_FILE}\nEOF\n"
