"""interpret_ack (kwatch.replicate.ack): a table of an Ack's per-path errors and what the sender does about them."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from kwatch.protocols.agent import PathError
from kwatch.replicate.ack import interpret_ack


@dataclass
class Case:
    name: str
    errors: list[tuple[bytes, str]]
    renames: list[tuple[bytes, bytes]] = field(default_factory=list)
    torn: set[bytes] = field(default_factory=set)
    checked: set[bytes] = field(default_factory=set)
    leaders: dict[bytes, bytes] = field(default_factory=dict)
    changed: list[bytes] = field(default_factory=list)
    # expected
    reported: list[bytes] = field(default_factory=list)
    rescan: list[bytes] = field(default_factory=list)
    resend: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)
    transient: list[bytes] = field(default_factory=list)


CASES = [
    Case("clean batch", []),
    Case("a real permission error is reported, nothing repaired", [(b"a", "EACCES")], reported=[b"a"]),
    Case("a missing directory is repaired", [(b"d/f", "ENOENT")], reported=[b"d/f"], missing=[b"d/f"]),
    Case("a full disk is retried", [(b"f", "ENOSPC")], reported=[b"f"], transient=[b"f"]),
    Case("only a path's first error decides", [(b"f", "ENOSPC"), (b"f", "ENOENT")], reported=[b"f", b"f"],
         transient=[b"f"]),
    Case("a torn put dropped on purpose is no error", [(b"f", "digest-mismatch")], torn={b"f"}),
    Case("a digest mismatch of a put not torn is real", [(b"f", "digest-mismatch")], reported=[b"f"]),
    Case("a rename of a name the mirror never had rescans the new name", [(b"old", "ENOENT")],
         renames=[(b"old", b"new")], rescan=[b"new"]),
    Case("... also when a parent of the old name was a file", [(b"old", "ENOTDIR")], renames=[(b"old", b"new")],
         rescan=[b"new"]),
    Case("... and the attributes of the new name under it follow", [(b"old", "ENOENT"), (b"new/x", "ENOENT")],
         renames=[(b"old", b"new")], rescan=[b"new"]),
    Case("an attribute error beside the renamed tree is real", [(b"old", "ENOENT"), (b"newer", "ENOENT")],
         renames=[(b"old", b"new")], rescan=[b"new"], reported=[b"newer"], missing=[b"newer"]),
    Case("a rename failing otherwise is real", [(b"old", "EACCES")], renames=[(b"old", b"new")],
         reported=[b"old"]),
    Case("a link to a put dropped on purpose follows its group", [(b"l", "ENOENT")], leaders={b"l": b"f"},
         changed=[b"f"]),
    Case("a link to a put that landed is real", [(b"l", "ENOENT")], leaders={b"l": b"f"}, reported=[b"l"],
         missing=[b"l"]),
    Case("a checked link the mirror refused sends the data", [(b"b", "ESTALE")], checked={b"b"}, resend=[b"b"]),
    Case("... also when the old name is gone there", [(b"b", "ENOENT")], checked={b"b"}, resend=[b"b"]),
    Case("a link to a checked link that is re-sent follows it", [(b"b", "ESTALE"), (b"c", "ENOENT")],
         checked={b"b"}, leaders={b"c": b"b"}, resend=[b"b"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_interpret_ack(case: Case) -> None:
    out = interpret_ack([PathError(p, code, "msg") for p, code in case.errors], renames=case.renames,
                        torn=case.torn, checked=case.checked, link_leaders=case.leaders, changed=case.changed)
    assert [e.relpath for e in out.reported] == case.reported
    assert (out.rescan, out.resend, out.missing, out.transient) == (case.rescan, case.resend, case.missing,
                                                                    case.transient)
