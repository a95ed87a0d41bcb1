"""The changedfiles format, read unchanged (the brief's example verbatim), and what its rules match."""

from __future__ import annotations

import pytest

from kwatch.events import ATTRIB_OPS, FT_REG, FileEvent, Op
from kwatch.rules import BatchMode, load_default_config, parse_config
from kwatch.rules.changedfiles import logical_lines, parse_changedfiles
from kwatch.rules.match import match_config, match_ruleset
from kwatch.rules.model import KEYWORD_OPS

VERBATIM = r"""RULE ^/export/home/image-converter.*\.jpg$
OPENW  /usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png
RULE ^/home/mike/test
IGNORE \.Xauthority
UNLINK  ssh faustus rm -f /mirrors/otto_FILE_
RENAME  ... _OLD_FILE_ ... _NEW_FILE_
"""


def test_verbatim_example_loads() -> None:
    cfg, errs = parse_config(VERBATIM, "changedfiles.conf")
    assert cfg is not None
    # Only a warning: ssh hands the name to a remote shell (the fix is _QFILE_).
    assert [str(e) for e in errs] == [
        "changedfiles.conf:5: warning: ssh hands its arguments to another shell, which would parse the file name "
        "as code; use _QFILE_/_QOLD_FILE_/_QNEW_FILE_ (the name quoted for a shell) in that part"
    ]
    (rs,) = cfg.rulesets
    r1, r2 = rs.rules
    assert r1.pattern == r"^/export/home/image-converter.*\.jpg$"
    assert r1.ignores == ()
    assert [(a.triggers, a.command.source, a.where.line) for a in r1.actions] == [
        (("OPENW",), "/usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png", 2)
    ]
    assert r2.pattern == "^/home/mike/test"
    assert r2.ignores == (r"\.Xauthority",)
    assert [(a.triggers, a.command.source) for a in r2.actions] == [
        (("UNLINK",), "ssh faustus rm -f /mirrors/otto_FILE_"),
        (("RENAME",), "... _OLD_FILE_ ... _NEW_FILE_"),
    ]
    assert all(a.options.batch is BatchMode.OFF for a in r1.actions + r2.actions)


# (name, event, expected [(rule line, trigger, _FILE_, _OLD_FILE_, _NEW_FILE_)])
E = FileEvent
MATCHES: dict[str, tuple[FileEvent, list[tuple[int, str, bytes, bytes, bytes]]]] = {
    "jpg closed after write": (
        E(Op.CLOSE_WRITE, b"/export/home/image-converter/in/a b.jpg"),
        [(1, "OPENW", b"/export/home/image-converter/in/a b.jpg", b"/export/home/image-converter/in/a b.jpg", b"")],
    ),
    "jpg opened for write: not yet": (E(Op.OPEN_WRITE, b"/export/home/image-converter/a.jpg"), []),
    "jpg modified: not yet": (E(Op.MODIFY, b"/export/home/image-converter/a.jpg"), []),
    "jpg created: not yet": (E(Op.CREATE, b"/export/home/image-converter/a.jpg"), []),
    "png written: regex anchored": (E(Op.CLOSE_WRITE, b"/export/home/image-converter/a.png"), []),
    "jpg renamed into place": (
        E(Op.RENAME, b"/export/home/image-converter/.a.jpg.tmp", new_path=b"/export/home/image-converter/a.jpg"),
        [(1, "OPENW", b"/export/home/image-converter/a.jpg", b"/export/home/image-converter/.a.jpg.tmp", b"/export/home/image-converter/a.jpg")],
    ),
    "jpg renamed to another jpg: already handled": (
        E(Op.RENAME, b"/export/home/image-converter/a.jpg", new_path=b"/export/home/image-converter/b.jpg"),
        [],
    ),
    "unlink under mike": (
        E(Op.UNLINK, b"/home/mike/test/x"),
        [(3, "UNLINK", b"/home/mike/test/x", b"/home/mike/test/x", b"")],
    ),
    "ignored path": (E(Op.UNLINK, b"/home/mike/test/.Xauthority"), []),
    "rename under mike": (
        E(Op.RENAME, b"/home/mike/test/a", new_path=b"/home/mike/test/b"),
        [(3, "RENAME", b"/home/mike/test/b", b"/home/mike/test/a", b"/home/mike/test/b")],
    ),
    "rename out of the tree": (
        E(Op.RENAME, b"/home/mike/test/a", new_path=b"/tmp/a"),
        [(3, "RENAME", b"/home/mike/test/a", b"/home/mike/test/a", b"/tmp/a")],
    ),
    "rename onto an ignored name still matches by the old one": (
        E(Op.RENAME, b"/home/mike/test/a", new_path=b"/home/mike/test/.Xauthority"),
        [(3, "RENAME", b"/home/mike/test/a", b"/home/mike/test/a", b"/home/mike/test/.Xauthority")],
    ),
    "other op under mike": (E(Op.MKDIR, b"/home/mike/test/d"), []),
    "outside every rule": (E(Op.UNLINK, b"/etc/passwd"), []),
    "loss marker": (E(Op.LOSS, b"/home/mike/test/x", lost=3), []),
    "truncated path": (E(Op.UNLINK, b"/home/mike/test/x", truncated=True), []),
}


@pytest.mark.parametrize("case", list(MATCHES), ids=list(MATCHES))
def test_matching(case: str) -> None:
    cfg, _ = parse_config(VERBATIM, "changedfiles.conf")
    assert cfg is not None
    ev, want = MATCHES[case]
    got = [(m.rule.where.line, m.action.triggers[0], m.file, m.old_file, m.new_file) for m in match_config(cfg, ev)]
    assert got == want


KEYWORD_CASES: dict[str, tuple[Op, set[str]]] = {
    "close_write": (Op.CLOSE_WRITE, {"OPENW", "CLOSEW", "ANY"}),
    "create": (Op.CREATE, {"CREATE", "ANY"}),
    "mkdir": (Op.MKDIR, {"MKDIR", "ANY"}),
    "rmdir": (Op.RMDIR, {"RMDIR", "ANY"}),
    "unlink": (Op.UNLINK, {"UNLINK", "ANY"}),
    "symlink": (Op.SYMLINK, {"SYMLINK", "ANY"}),
    "link": (Op.LINK, {"LINK", "ANY"}),
    "truncate": (Op.TRUNCATE, {"TRUNCATE", "ANY"}),
    "chmod": (Op.CHMOD, {"ATTRIB", "ANY"}),
    "chown": (Op.CHOWN, {"ATTRIB", "ANY"}),
    "xattr": (Op.XATTR, {"ATTRIB", "ANY"}),
    "utimes": (Op.UTIMES, {"ATTRIB", "ANY"}),
    "attrib": (Op.ATTRIB, {"ATTRIB", "ANY"}),
    "open_write": (Op.OPEN_WRITE, {"ANY"}),
    "modify": (Op.MODIFY, {"ANY"}),
    "loss": (Op.LOSS, set()),
}


@pytest.mark.parametrize("case", list(KEYWORD_CASES), ids=list(KEYWORD_CASES))
def test_every_keyword(case: str) -> None:
    text = "RULE ^/w/\n" + "".join(f"{kw} echo {kw}\n" for kw in KEYWORD_OPS)
    cfg, errs = parse_config(text, "k.conf")
    assert cfg is not None, errs
    op, want = KEYWORD_CASES[case]
    ev = FileEvent(op, b"/w/f", new_path=b"/w/g" if op in (Op.RENAME, Op.LINK) else None, ftype=FT_REG)
    assert {m.action.triggers[0] for m in match_config(cfg, ev)} == want


def test_attrib_keyword_is_attrib_ops() -> None:
    assert KEYWORD_OPS["ATTRIB"] == ATTRIB_OPS


def test_comments_blank_lines_continuations_crlf() -> None:
    text = (
        "# leading comment\r\n"
        "\r\n"
        "   # indented comment\r\n"
        "RULE ^/data/\\\r\n"
        "(a|b)/\r\n"
        "IGNORE \\.swp$\r\n"
        "OPENW cp _FILE_ \\\r\n"
        "   /backup/ # a shell comment stays in the command\r\n"
        "UNLINK echo ends-in-escaped-backslash \\\\\r\n"
        "RMDIR echo next\r\n"
    )
    cfg, errs = parse_config(text, "c.conf")
    assert cfg is not None and errs == []
    (rule,) = cfg.rulesets[0].rules
    assert rule.pattern == "^/data/(a|b)/"
    assert rule.where.line == 4
    assert rule.ignores == (r"\.swp$",)
    assert [(a.where.line, a.command.source) for a in rule.actions] == [
        (7, "cp _FILE_    /backup/ # a shell comment stays in the command"),
        (9, "echo ends-in-escaped-backslash \\\\"),
        (10, "echo next"),
    ]


def test_logical_lines() -> None:
    assert logical_lines("a\\\nb\nc\\\\\nd\ne\\") == [(1, "ab"), (3, "c\\\\"), (4, "d"), (5, "e")]


def test_non_utf8_regex_matches_bytes() -> None:
    text = b"RULE ^/srv/caf\xe9/\nUNLINK echo _FILE_\n".decode("utf-8", "surrogateescape")
    rs, errs = parse_changedfiles(text, "latin1.conf")
    assert rs is not None and errs == []
    assert [m.file for m in match_ruleset(rs, FileEvent(Op.UNLINK, b"/srv/caf\xe9/x"))] == [b"/srv/caf\xe9/x"]
    assert match_ruleset(rs, FileEvent(Op.UNLINK, "/srv/café/x".encode())) == []


def test_several_actions_for_one_op_fire_in_order() -> None:
    cfg, _ = parse_config("RULE /x$\nUNLINK echo one\nUNLINK echo two\nANY echo three\n", "o.conf")
    assert cfg is not None
    got = [m.action.command.source for m in match_config(cfg, FileEvent(Op.UNLINK, b"/a/x"))]
    assert got == ["echo one", "echo two", "echo three"]


def test_several_rules_can_match_one_event() -> None:
    cfg, _ = parse_config("RULE ^/a\nUNLINK echo 1\nRULE x$\nUNLINK echo 2\n", "m.conf")
    assert cfg is not None
    assert [m.rule.where.line for m in match_config(cfg, FileEvent(Op.UNLINK, b"/a/x"))] == [1, 3]


def test_capture_ops_needed() -> None:
    cfg, _ = parse_config(VERBATIM, "changedfiles.conf")
    assert cfg is not None
    assert cfg.ops == {Op.CLOSE_WRITE, Op.RENAME, Op.UNLINK}


def test_default_config_is_harmless_and_visible() -> None:
    cfg = load_default_config()
    assert cfg.warnings == ()
    got = match_config(cfg, FileEvent(Op.CLOSE_WRITE, b"/tmp/kwatch-demo/a"))
    assert [m.action.command.source.split()[0] for m in got] == ["printf"]
    assert match_config(cfg, FileEvent(Op.CLOSE_WRITE, b"/tmp/kwatch-demonstration")) == []
    assert match_config(cfg, FileEvent(Op.CLOSE_WRITE, b"/etc/passwd")) == []
    renamed = match_config(cfg, FileEvent(Op.RENAME, b"/tmp/kwatch-demo/a", new_path=b"/tmp/kwatch-demo/b"))
    assert len(renamed) == 2
