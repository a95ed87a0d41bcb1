"""The config model both config formats load into: Config, RuleSet, Rule, Action, ProcessFilter, ReplicateTarget.

Pure: no I/O. Objects are frozen; loaders (:mod:`kwatch.rules.changedfiles`, :mod:`kwatch.rules.tomlconf`) build them
and check them, so the daemon and the runner can trust what they get.

Operation keywords (the changedfiles names, used by both formats) and what they fire on:

============  =======================================================================================================
keyword       fires on
============  =======================================================================================================
``OPENW``     a *finished* write: the writer closed a file it had open for writing (``Op.CLOSE_WRITE``), or a file
              was renamed from a path the rule does not match to one it does (``tmp`` -> ``photo.jpg``, how rsync,
              browsers and careful writers publish a file). Never on the open itself: a hot-folder action such as
              ``convert`` must not read a half-written file. The old open-time behaviour is ``op:open_write`` in TOML.
``CLOSEW``    ``Op.CLOSE_WRITE`` only
``CREATE``    ``Op.CREATE`` (the file exists but is usually still empty)
``MKDIR``     ``Op.MKDIR``;  ``RMDIR``: ``Op.RMDIR``;  ``UNLINK``: ``Op.UNLINK``;  ``SYMLINK``: ``Op.SYMLINK``
``RENAME``    ``Op.RENAME`` (``_OLD_FILE_`` -> ``_NEW_FILE_``);  ``LINK``: ``Op.LINK`` (existing -> new link)
``TRUNCATE``  ``Op.TRUNCATE`` (truncate/ftruncate; an ``O_TRUNC`` open is a write and shows up as OPENW)
``ATTRIB``    every metadata op: ``events.ATTRIB_OPS`` (chmod, chown, xattr, utimes, and ATTRIB from fanotify/inotify)
``ANY``       every op except the ``LOSS`` marker
============  =======================================================================================================
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kwatch.context import ContextFilter
from kwatch.events import ATTRIB_OPS, Op
from kwatch.rules.errors import ConfigError
from kwatch.rules.shell import CompiledCommand

if TYPE_CHECKING:
    from kwatch.outputs.config import OutputSpec

KEYWORD_OPS: dict[str, frozenset[Op]] = {
    "OPENW": frozenset({Op.CLOSE_WRITE}),  # plus rename-into-place, see the module docstring and match.py
    "CLOSEW": frozenset({Op.CLOSE_WRITE}),
    "CREATE": frozenset({Op.CREATE}),
    "MKDIR": frozenset({Op.MKDIR}),
    "SYMLINK": frozenset({Op.SYMLINK}),
    "UNLINK": frozenset({Op.UNLINK}),
    "RMDIR": frozenset({Op.RMDIR}),
    "RENAME": frozenset({Op.RENAME}),
    "LINK": frozenset({Op.LINK}),
    "TRUNCATE": frozenset({Op.TRUNCATE}),
    "ATTRIB": frozenset(ATTRIB_OPS),
    "ANY": frozenset(op for op in Op if op is not Op.LOSS),
}

#: Linux keeps 15 bytes of a process name (TASK_COMM_LEN 16 with the NUL); longer config names are cut to match.
COMM_LEN = 15


class BatchMode(enum.Enum):
    OFF = "off"  # one command per file (after debounce)
    ARGS = (
        "args"  # one command per batch; files are "$@" (_FILES_), split into several commands under ARG_MAX
    )
    STDIN = "stdin"  # one command per batch; files arrive on stdin, each ended by NUL


@dataclass(frozen=True)
class Where:
    """Where something was written: file and 1-based line (0: the file as a whole)."""

    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class ActionOptions:
    """How the runner treats one action. Defaults suit the changedfiles format (which cannot set them)."""

    debounce: float = (
        0.0  # seconds of quiet on one file before its action runs; repeated events are coalesced
    )
    debounce_max: float | None = (
        None  # longest wait under a continuous stream of events (None: 10 x debounce)
    )
    timeout: float | None = 600.0  # then SIGTERM to the process group, and SIGKILL after kill_grace
    kill_grace: float = 5.0
    batch: BatchMode = BatchMode.OFF
    batch_window: float = 1.0  # a batch collects files this long after its first one
    batch_max: int = 5000  # files per batch; a full batch starts at once
    retrigger: bool = False  # events caused by this action's processes may trigger rules again
    user: str | None = None  # run as this user (a name or a uid), with its groups; None: as the daemon
    group: str | None = None  # primary group (a name or a gid); None: the user's (or the daemon's)


@dataclass(frozen=True)
class Action:
    """One command and the operation keywords that start it."""

    triggers: tuple[str, ...]  # keywords as written (OPENW, ...) and raw ops (op:open_write)
    ops: frozenset[Op]
    command: CompiledCommand
    options: ActionOptions
    where: Where

    @property
    def on_finished_write(self) -> bool:
        """OPENW also fires when a finished file is renamed into a matching path."""
        return "OPENW" in self.triggers


#: levels an alert can have: syslog's, as the journal's PRIORITY field takes them
ALERT_LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")


@dataclass(frozen=True)
class Alert:
    """A rule's alert: a structured record at ``level`` to every output (and a warning in the daemon's log) when one
    of ``ops`` happens on a path the rule matches. The same triggers as an action; no command runs."""

    triggers: tuple[str, ...]
    ops: frozenset[Op]
    message: str
    level: str
    where: Where

    @property
    def on_finished_write(self) -> bool:
        return "OPENW" in self.triggers


@dataclass(frozen=True)
class Rule:
    """A path regex, the regexes that exclude paths from it, and its actions.

    Regexes are matched with ``search`` against the whole absolute path as bytes (so anchor with ``^``/``$``);
    a config's text is decoded as UTF-8 with surrogateescape, so non-UTF-8 bytes in a regex match themselves.
    """

    name: str
    pattern: str
    ignores: tuple[str, ...]
    actions: tuple[Action, ...]
    where: Where
    concurrency: int = 4  # actions of this rule running at once
    regex: re.Pattern[bytes] = field(default=re.compile(b""), compare=False, repr=False)
    ignore_res: tuple[re.Pattern[bytes], ...] = field(default=(), compare=False, repr=False)
    alerts: tuple[Alert, ...] = ()

    @classmethod
    def make(
        cls,
        name: str,
        pattern: str,
        ignores: tuple[str, ...],
        actions: tuple[Action, ...],
        where: Where,
        concurrency: int = 4,
        alerts: tuple[Alert, ...] = (),
    ) -> Rule:
        """Build a rule and compile its regexes (raises re.error for a bad one)."""
        return cls(
            name,
            pattern,
            ignores,
            actions,
            where,
            concurrency,
            compile_regex(pattern),
            tuple(compile_regex(i) for i in ignores),
            alerts,
        )

    def matches(self, path: bytes) -> bool:
        return self.regex.search(path) is not None and not any(i.search(path) for i in self.ignore_res)


def compile_regex(pattern: str) -> re.Pattern[bytes]:
    return re.compile(pattern.encode("utf-8", "surrogateescape"))


@dataclass(frozen=True)
class ProcessFilter:
    """Which processes' events a rule set sees. Empty: all of them.

    An include filter (``uids``, ``comms``) needs the value: an event whose backend does not know its uid/comm
    (inotify) does not pass it. Exclude filters drop only what they can recognise. ``context`` filters on the
    process context (exe, login uid, user name, container, cgroup: :class:`kwatch.context.ContextFilter`).
    """

    uids: frozenset[int] | None = None
    exclude_uids: frozenset[int] = frozenset()
    comms: frozenset[bytes] | None = None  # already cut to COMM_LEN
    exclude_comms: frozenset[bytes] = frozenset()
    exclude_descendants_of: tuple[
        int | bytes, ...
    ] = ()  # pids or process names; the process itself counts too
    context: ContextFilter = field(default_factory=ContextFilter)

    @property
    def empty(self) -> bool:
        return self == ProcessFilter()


@dataclass(frozen=True)
class RuleSet:
    """Rules that share a process filter. A changedfiles file is one rule set."""

    name: str
    rules: tuple[Rule, ...]
    process: ProcessFilter = ProcessFilter()
    where: Where = Where("", 0)
    replicate: tuple[ReplicateTarget, ...] = ()  # REPLICATE lines of a changedfiles file


@dataclass(frozen=True)
class ReplicateTarget:
    """A ``[[replicate]]`` table: the target string and every other key as options, for the replicate package."""

    target: str
    options: dict[str, object]
    where: Where


@dataclass(frozen=True)
class Config:
    """Everything one config file (plus the changedfiles files it includes) says."""

    rulesets: tuple[RuleSet, ...]
    replicate: tuple[ReplicateTarget, ...] = ()
    max_concurrency: int = 8  # actions running at once over all rules
    shell: str = "/bin/sh"
    files: tuple[str, ...] = ()  # every file read, for reload-on-change
    warnings: tuple[ConfigError, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()  # [[output]] tables (kwatch.outputs)

    @property
    def has_alerts(self) -> bool:
        return any(rule.alerts for rs in self.rulesets for rule in rs.rules)

    @property
    def ops(self) -> frozenset[Op]:
        """Every op some action fires on: what the capture filter needs (RENAME too when OPENW is used)."""
        ops: set[Op] = set()
        for rs in self.rulesets:
            for rule in rs.rules:
                triggers: tuple[Action | Alert, ...] = (*rule.actions, *rule.alerts)
                for a in triggers:
                    ops |= a.ops
                    if a.on_finished_write:
                        ops.add(Op.RENAME)
        return frozenset(ops)
