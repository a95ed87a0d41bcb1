"""Rule matching: which (rule, action) pairs an event starts, and the values of its placeholders. Pure.

Semantics, in the order they are checked:

- a ``LOSS`` marker and a ``truncated`` path (a suffix, not a whole path) never start an action;
- the rule set's process filter must accept the event (:class:`ProcessTree` answers ancestry questions; without one,
  ``exclude_descendants_of`` can only see the event's own pid and comm; for a process that has exited, the
  event's own pid and comm and then its parent's ancestry, from ``ppid``, are checked);
- a rule matches when its regex finds the path (or, for rename/link, either path) and no IGNORE regex finds it;
- an action fires when the event's op is among its ops, or, for ``OPENW``, when a rename moved a file from a path
  the rule does not match to one it does (a finished file published under its final name);
- a rule's alerts (:class:`AlertMatch`, :func:`match_alerts`) fire by the same rules as its actions.

Placeholder values: ``_FILE_`` is the matched path (rename/link: the new path when it matches, else the old one);
``_OLD_FILE_`` the event's path; ``_NEW_FILE_`` the new path of a rename/link, else empty.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from kwatch.events import FileEvent, Op
from kwatch.rules.model import COMM_LEN, Action, Alert, Config, ProcessFilter, Rule, RuleSet

if TYPE_CHECKING:
    from kwatch.context import ProcInfo


class ProcessTree(Protocol):
    """Process ancestry and context, supplied by the daemon (``kwatch.rules.procfs.ProcFS`` reads /proc)."""

    def ancestry(self, pid: int) -> Sequence[tuple[int, bytes]]:
        """(pid, comm) of ``pid`` itself, then its parent, and so on up to pid 1; empty when unknown."""
        ...

    def context(self, ev: FileEvent) -> ProcInfo | None:
        """The event's process context (exe, login uid, container...: :mod:`kwatch.context`); None when unknown."""
        ...


@dataclass(frozen=True)
class Match:
    """One action to run for one event."""

    rule: Rule
    action: Action
    event: FileEvent
    file: bytes
    old_file: bytes
    new_file: bytes

    @property
    def op(self) -> str:
        return self.event.op.label


@dataclass(frozen=True)
class AlertMatch:
    """One alert raised by one event."""

    rule: Rule
    alert: Alert
    event: FileEvent
    file: bytes

    @property
    def rule_name(self) -> str:
        return self.rule.name

    @property
    def message(self) -> str:
        return self.alert.message

    @property
    def level(self) -> str:
        return self.alert.level


def process_accepts(pf: ProcessFilter, ev: FileEvent, procs: ProcessTree | None) -> bool:
    if pf.uids is not None and (ev.uid is None or ev.uid not in pf.uids):
        return False
    if ev.uid is not None and ev.uid in pf.exclude_uids:
        return False
    comm = ev.comm[:COMM_LEN] if ev.comm is not None else None
    if pf.comms is not None and (comm is None or comm not in pf.comms):
        return False
    if comm is not None and comm in pf.exclude_comms:
        return False
    if pf.exclude_descendants_of and ev.pid is not None:
        chain: Sequence[tuple[int, bytes]] = procs.ancestry(ev.pid) if procs is not None else ()
        if not chain:
            # the process has exited (a short-lived child, e.g. a package's maintainer script): its own pid and
            # comm, then its parent's ancestry when the parent is still there
            parents = procs.ancestry(ev.ppid) if procs is not None and ev.ppid else ()
            chain = [(ev.pid, comm or b""), *parents]
        for pid, name in chain:
            for x in pf.exclude_descendants_of:
                if (isinstance(x, int) and x == pid) or (isinstance(x, bytes) and x == name[:COMM_LEN]):
                    return False
    if not pf.context.empty:
        return pf.context.accepts(procs.context(ev) if procs is not None else None)
    return True


def _hits(rs: RuleSet, ev: FileEvent, procs: ProcessTree | None) -> Iterator[tuple[Rule, bytes, bool, bool]]:
    """(rule, matched file, old path matched, new path matched) of every rule that matches the event."""
    if ev.op is Op.LOSS or ev.truncated:
        return
    if not rs.process.empty and not process_accepts(rs.process, ev, procs):
        return
    for rule in rs.rules:
        old_hit = rule.matches(ev.path)
        new_hit = ev.new_path is not None and rule.matches(ev.new_path)
        if old_hit or new_hit:
            yield rule, ev.new_path if new_hit and ev.new_path is not None else ev.path, old_hit, new_hit


def _fires(trigger: Action | Alert, ev: FileEvent, old_hit: bool, new_hit: bool) -> bool:
    return ev.op in trigger.ops or (trigger.on_finished_write and ev.op is Op.RENAME and new_hit and not old_hit)


def match_ruleset(rs: RuleSet, ev: FileEvent, procs: ProcessTree | None = None) -> list[Match]:
    out: list[Match] = []
    for rule, file, old_hit, new_hit in _hits(rs, ev, procs):
        for action in rule.actions:
            if _fires(action, ev, old_hit, new_hit):
                out.append(Match(rule, action, ev, file, ev.path, ev.new_path or b""))
    return out


def match_config(config: Config, ev: FileEvent, procs: ProcessTree | None = None) -> list[Match]:
    """Matches over every rule set, in config order."""
    return [m for rs in config.rulesets for m in match_ruleset(rs, ev, procs)]


def config_alerts(config: Config, ev: FileEvent, procs: ProcessTree | None = None) -> list[AlertMatch]:
    """Alerts over every rule set, in config order."""
    return [a for rs in config.rulesets for a in match_alerts(rs, ev, procs)]


def match_alerts(rs: RuleSet, ev: FileEvent, procs: ProcessTree | None = None) -> list[AlertMatch]:
    out: list[AlertMatch] = []
    for rule, file, old_hit, new_hit in _hits(rs, ev, procs):
        for alert in rule.alerts:
            if _fires(alert, ev, old_hit, new_hit):
                out.append(AlertMatch(rule, alert, ev, file))
    return out
