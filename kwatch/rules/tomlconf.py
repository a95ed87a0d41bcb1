"""The TOML config format (read with tomllib) into the same model as changedfiles. Pure except for reading the
changedfiles files a rule set includes, through the ``read`` function the caller passes.

Schema (every key optional unless marked)::

    [runner]
    max_concurrency = 8          # actions running at once, all rules together
    shell = "/bin/sh"

    [defaults]                   # inherited by every rule and action; each key can be overridden there
    debounce = 0.0               # seconds of quiet on one file before its action runs (bursts are coalesced)
    debounce_max = 10.0          # longest wait under a continuous stream (default 10 x debounce)
    timeout = 600                # seconds; then SIGTERM to the process group, SIGKILL after kill_grace
    kill_grace = 5
    user = "www-data"            # run actions as this user (name or uid) with its groups; default: as kwatch
    group = "www-data"           # primary group (name or gid); default: the user's
    concurrency = 4              # actions of one rule running at once
    batch = false                # false | "args" (files are _FILES_) | "stdin" (NUL-separated paths)
    batch_window = 1.0           # a batch collects files this long
    batch_max = 5000             # files per batch
    retrigger = false            # true: events caused by this action's processes may trigger rules again

    [[ruleset]]
    name = "images"
    changedfiles = "legacy.conf" # rules from a changedfiles file (relative to this file), before the rules below
    user = "images"              # user/group here: the default of this rule set's rules and its changedfiles file

    [ruleset.process]            # which processes' events this rule set sees
    uid = [1000]                 # only these uids
    exclude_uid = [0]
    comm = ["cp", "scp"]         # only these process names (first 15 bytes, as the kernel keeps them)
    exclude_comm = ["backup"]
    exclude_descendants_of = ["rsync", 1234]   # process names or pids; their whole subtree is ignored
    exe = ['^/usr/bin/']         # the process context (kwatch.context): executable path regexes
    exclude_exe = ['^/usr/bin/dpkg$']
    auid = [1000]                # login uids (kept through sudo and su)
    user = ["mike"]              # user names
    container = ["docker"]       # container ids, prefixes of ids, or runtimes
    cgroup = ['^/system\\.slice/nginx\\.service$']   # cgroup v2 path regexes

    [[ruleset.rule]]
    match = '^/export/home/image-converter.*\\.jpg$'   # required
    ignore = ['\\.Xauthority']
    on = ["OPENW"]               # keywords as in changedfiles, or raw ops: "op:open_write"
    run = "/usr/bin/convert _FILE_ ..."
    # ...or several actions, each with its own on/run and option overrides:
    [[ruleset.rule.action]]
    on = ["UNLINK"]
    run = "ssh faustus rm -f /mirrors/otto_QFILE_"

    [[ruleset.rule]]             # an alert: a structured record to every output (and a warning in the log)
    match = '^/etc/shadow$'
    on = ["OPENW", "UNLINK"]
    alert = "the shadow password file changed"    # with or instead of run; also in [[...action]] tables
    level = "warning"            # syslog level: emerg alert crit err warning notice info debug

    [[rule]]                     # top-level rules form a rule set named "default"

    [[output]]                   # durable outputs: see kwatch.outputs.config
    type = "file"
    path = "/var/log/kwatch/audit.jsonl"

    [[replicate]]
    target = "ssh://mirror/srv/data"   # required; every other key is kept as an option for kwatch.replicate

tomllib reports only the first syntax error of a file; everything after parsing (unknown keys, wrong types, bad
regexes, bad commands) is collected in full, each with the line of the key it concerns.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from typing import Any

from kwatch.context import ContextFilter
from kwatch.events import Op
from kwatch.outputs.config import OutputSpec, parse_output
from kwatch.rules.build import make_action, parse_trigger
from kwatch.rules.changedfiles import parse_changedfiles
from kwatch.rules.errors import ConfigError, UnsafeFileError, in_order
from kwatch.rules.model import (
    ALERT_LEVELS,
    COMM_LEN,
    Action,
    ActionOptions,
    Alert,
    BatchMode,
    Config,
    ProcessFilter,
    ReplicateTarget,
    Rule,
    RuleSet,
    Where,
)
from kwatch.rules.replication import check_options, check_target

Path = tuple[str | int, ...]

_OPTION_KEYS = (
    "debounce",
    "debounce_max",
    "timeout",
    "kill_grace",
    "batch",
    "batch_window",
    "batch_max",
    "retrigger",
    "user",
    "group",
)
_RULE_LEVEL = ("concurrency",)
_TOP_KEYS = ("runner", "defaults", "ruleset", "rule", "replicate", "output")


# -- where keys are: tomllib keeps no positions, so a light scan of the text finds the line of each key ------------

_HEADER = re.compile(r"\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(?:#.*)?$")
_KEY = re.compile(
    r"""\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*="""
)


def _split_dotted(s: str) -> list[str]:
    parts = re.findall(r"""[A-Za-z0-9_-]+|"[^"]*"|'[^']*'""", s)
    return [p[1:-1] if p[:1] in "\"'" else p for p in parts]


class Locator:
    """Maps key paths like ("ruleset", 0, "rule", 2, "match") to 1-based lines."""

    def __init__(self, text: str) -> None:
        self.lines: dict[Path, int] = {}
        counts: dict[Path, int] = {}
        current: Path = ()
        in_multiline: str | None = None
        for n, line in enumerate(text.split("\n"), 1):
            if in_multiline is not None:
                if line.count(in_multiline) % 2 == 1:
                    in_multiline = None
                continue
            h = _HEADER.match(line)
            if h is not None:
                names = _split_dotted(h.group(2))
                resolved: list[str | int] = []
                for i, name in enumerate(names):
                    resolved.append(name)
                    last = i == len(names) - 1
                    if last and h.group(1) == "[[":
                        key = tuple(resolved)
                        counts[key] = counts.get(key, 0) + 1
                        resolved.append(counts[key] - 1)
                    elif tuple(resolved) in counts:
                        resolved.append(counts[tuple(resolved)] - 1)
                current = tuple(resolved)
                self.lines.setdefault(current, n)
                continue
            k = _KEY.match(line)
            if k is not None:
                self.lines.setdefault((*current, *_split_dotted(k.group(1))), n)
                rest = line[k.end() :]
                for q in ('"""', "'''"):
                    if rest.count(q) % 2 == 1:
                        in_multiline = q
                        break

    def line(self, path: Path) -> int:
        p = path
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return 0


# -- the loader -----------------------------------------------------------------------------------------------------


class _Fields:
    """The values of one TOML file: typed getters that report a wrong value (with its line) and return the default."""

    def __init__(self, text: str, filename: str) -> None:
        self.filename = filename
        self.loc = Locator(text)
        self.errors: list[ConfigError] = []

    def err(self, path: Path, reason: str, severity: str = "error") -> None:
        self.errors.append(ConfigError(self.filename, self.loc.line(path), reason, severity))

    def where(self, path: Path) -> Where:
        return Where(self.filename, self.loc.line(path))

    def check_keys(self, table: dict[str, Any], path: Path, allowed: tuple[str, ...], what: str) -> None:
        for key in table:
            if key not in allowed:
                self.err((*path, key), f"unknown key {key!r} in {what} (allowed: {', '.join(allowed)})")

    # typed getters: each reports a wrong type and returns the default

    def number(
        self, table: dict[str, Any], key: str, path: Path, default: float | None, minimum: float = 0.0
    ) -> float | None:
        if key not in table:
            return default
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, int | float):
            self.err((*path, key), f"{key} must be a number of seconds, not {v!r}")
            return default
        if v < minimum:
            self.err((*path, key), f"{key} must be >= {minimum:g}, not {v!r}")
            return default
        return float(v)

    def integer(self, table: dict[str, Any], key: str, path: Path, default: int, minimum: int = 1) -> int:
        if key not in table:
            return default
        v = table[key]
        if isinstance(v, bool) or not isinstance(v, int):
            self.err((*path, key), f"{key} must be an integer, not {v!r}")
            return default
        if v < minimum:
            self.err((*path, key), f"{key} must be >= {minimum}, not {v!r}")
            return default
        return v

    def options(self, table: dict[str, Any], path: Path, base: ActionOptions) -> ActionOptions:
        debounce = self.number(table, "debounce", path, base.debounce)
        debounce_max = self.number(table, "debounce_max", path, base.debounce_max)
        timeout = self.number(table, "timeout", path, base.timeout)
        if "timeout" in table and timeout == 0.0:
            timeout = None  # 0: no timeout
        kill_grace = self.number(table, "kill_grace", path, base.kill_grace)
        batch_window = self.number(table, "batch_window", path, base.batch_window)
        batch_max = self.integer(table, "batch_max", path, base.batch_max)
        batch = base.batch
        if "batch" in table:
            v = table["batch"]
            if v is False:
                batch = BatchMode.OFF
            elif v in ("args", "stdin"):
                batch = BatchMode(v)
            else:
                self.err((*path, "batch"), f'batch must be false, "args" or "stdin", not {v!r}')
        retrigger = base.retrigger
        if "retrigger" in table:
            v = table["retrigger"]
            if isinstance(v, bool):
                retrigger = v
            else:
                self.err((*path, "retrigger"), f"retrigger must be true or false, not {v!r}")
        return ActionOptions(
            user=self.account(table, "user", path, base.user),
            group=self.account(table, "group", path, base.group),
            debounce=debounce if debounce is not None else base.debounce,
            debounce_max=debounce_max,
            timeout=timeout,
            kill_grace=kill_grace if kill_grace is not None else base.kill_grace,
            batch=batch,
            batch_window=batch_window if batch_window is not None else base.batch_window,
            batch_max=batch_max,
            retrigger=retrigger,
        )

    def account(self, table: dict[str, Any], key: str, path: Path, default: str | None) -> str | None:
        """A user or group: a name, or a numeric id (kept as its decimal string)."""
        if key not in table:
            return default
        v = table[key]
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            return str(v)
        if isinstance(v, str) and v and not v.startswith("-") and ":" not in v and not v.isspace():
            return v
        self.err((*path, key), f"{key} must be a {key} name or a numeric id, not {v!r}")
        return default

    def string_list(self, table: dict[str, Any], key: str, path: Path) -> list[str]:
        if key not in table:
            return []
        v = table[key]
        if isinstance(v, str):
            return [v]
        if isinstance(v, list) and all(isinstance(x, str) for x in v):
            return list(v)
        self.err((*path, key), f"{key} must be a string or a list of strings, not {v!r}")
        return []

    def regex(self, pattern: str, path: Path) -> bool:
        try:
            re.compile(pattern.encode("utf-8", "surrogateescape"))
        except re.error as e:
            self.err(path, f"bad regex {pattern!r}: {e}")
            return False
        return True

    def process(self, table: Any, path: Path) -> ProcessFilter:
        if not isinstance(table, dict):
            self.err(path, "process must be a table")
            return ProcessFilter()
        self.check_keys(
            table, path, ("uid", "exclude_uid", "comm", "exclude_comm", "exclude_descendants_of", "exe",
                          "exclude_exe", "auid", "user", "container", "cgroup"), "process"
        )

        def ints(key: str) -> frozenset[int] | None:
            if key not in table:
                return None
            v = table[key]
            if isinstance(v, int) and not isinstance(v, bool):
                v = [v]
            if isinstance(v, list) and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v
            ):
                return frozenset(v)
            self.err((*path, key), f"{key} must be a list of uids (integers), not {v!r}")
            return None

        def regexes(key: str) -> tuple[re.Pattern[bytes], ...]:
            return tuple(re.compile(p.encode("utf-8", "surrogateescape"))
                         for p in self.string_list(table, key, path) if self.regex(p, (*path, key)))

        def names(key: str) -> frozenset[bytes] | None:
            if key not in table:
                return None
            return frozenset(
                s.encode("utf-8", "surrogateescape")[:COMM_LEN] for s in self.string_list(table, key, path)
            )

        desc: list[int | bytes] = []
        v = table.get("exclude_descendants_of", [])
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and not isinstance(x, bool) and x > 0:
                desc.append(x)
            elif isinstance(x, str) and x:
                desc.append(x.encode("utf-8", "surrogateescape")[:COMM_LEN])
            else:
                self.err(
                    (*path, "exclude_descendants_of"),
                    f"exclude_descendants_of takes pids or process names, not {x!r}",
                )
        cgroups = []
        for p in self.string_list(table, "cgroup", path):
            try:
                cgroups.append(re.compile(p))
            except re.error as e:
                self.err((*path, "cgroup"), f"bad regex {p!r}: {e}")
        return ProcessFilter(
            uids=ints("uid"),
            exclude_uids=ints("exclude_uid") or frozenset(),
            comms=names("comm"),
            exclude_comms=names("exclude_comm") or frozenset(),
            exclude_descendants_of=tuple(desc),
            context=ContextFilter(
                exes=regexes("exe"),
                exclude_exes=regexes("exclude_exe"),
                auids=ints("auid") or frozenset(),
                users=frozenset(self.string_list(table, "user", path)),
                containers=tuple(self.string_list(table, "container", path)),
                cgroups=tuple(cgroups),
            ),
        )


class _Loader:
    """The sections of a config file (rulesets, rules, actions, alerts, targets, includes) into a :class:`Config`."""

    def __init__(self, text: str, filename: str, read: Callable[[str], str] | None) -> None:
        self.fields = _Fields(text, filename)
        self.filename = filename
        self.errors = self.fields.errors
        self.err = self.fields.err
        self.where = self.fields.where
        self.read = read
        self.files: list[str] = [filename]
        self.included_targets: list[ReplicateTarget] = []  # REPLICATE lines of included changedfiles

    # sections

    def action(self, table: dict[str, Any], path: Path, opts: ActionOptions) -> Action | None:
        triggers = tuple(
            t.upper() if not t.startswith("op:") else t for t in self.fields.string_list(table, "on", path)
        )
        if "on" not in table:
            self.err(path, "an action needs 'on' (the operations that start it)")
            return None
        if "run" not in table:
            self.err(path, "an action needs 'run' (the command)")
            return None
        run = table["run"]
        if not isinstance(run, str):
            self.err((*path, "run"), f"run must be a string, not {run!r}")
            return None
        action, problems = make_action(triggers, run, opts, self.where((*path, "run")))
        self.errors.extend(problems)
        return action

    def action_and_alert(self, table: dict[str, Any], action_table: dict[str, Any], path: Path, opts: ActionOptions,
                         actions: list[Action], alerts: list[Alert]) -> bool:
        """The action (``action_table``: its on/run) and the alert a rule's ``table`` declares, appended to
        ``actions`` and ``alerts``; False when one of them is wrong."""
        ok = True
        if "run" in table or "alert" not in table:
            a = self.action(action_table, path, opts)
            ok = a is not None
            if a is not None:
                actions.append(a)
        if "alert" in table:
            al = self.alert(table, path)
            ok = ok and al is not None
            if al is not None:
                alerts.append(al)
        return ok

    def alert(self, table: dict[str, Any], path: Path) -> Alert | None:
        triggers = tuple(
            t.upper() if not t.startswith("op:") else t for t in self.fields.string_list(table, "on", path)
        )
        if "on" not in table or not triggers:
            self.err((*path, "alert"), "an alert needs 'on' (the operations that raise it)")
            return None
        msg, level = table["alert"], table.get("level", "warning")
        if not isinstance(msg, str) or not msg:
            self.err((*path, "alert"), f"alert must be a message (a non-empty string), not {msg!r}")
            return None
        if level not in ALERT_LEVELS:
            self.err((*path, "level"), f"level must be one of {', '.join(ALERT_LEVELS)}, not {level!r}")
            return None
        ops: set[Op] = set()
        for t in triggers:
            got = parse_trigger(t)
            if got is None:
                self.err((*path, "on"), f"unknown operation {t!r}")
                return None
            ops |= got
        return Alert(triggers, frozenset(ops), msg, level, self.where((*path, "alert")))

    def rule(
        self, table: dict[str, Any], path: Path, base: ActionOptions, concurrency: int, index: int
    ) -> Rule | None:
        self.fields.check_keys(
            table,
            path,
            ("name", "match", "ignore", "on", "run", "alert", "level", "action", *_RULE_LEVEL, *_OPTION_KEYS),
            "a rule",
        )
        ok = True
        pattern = table.get("match")
        if pattern is None:
            self.err(path, "a rule needs 'match' (a regex for the path)")
            ok = False
        elif not isinstance(pattern, str):
            self.err((*path, "match"), f"match must be a string, not {pattern!r}")
            ok = False
        else:
            ok = self.fields.regex(pattern, (*path, "match")) and ok
        ignores = self.fields.string_list(table, "ignore", path)
        for i, ig in enumerate(ignores):
            ok = self.fields.regex(ig, (*path, "ignore", i)) and ok
        opts = self.fields.options(table, path, base)
        conc = self.fields.integer(table, "concurrency", path, concurrency)
        actions: list[Action] = []
        alerts: list[Alert] = []
        sub = table.get("action")
        has_inline = "on" in table or "run" in table or "alert" in table
        if sub is not None and has_inline:
            self.err(path, "a rule has either on/run/alert or [[...action]] tables, not both")
            ok = False
        elif has_inline:
            inline: dict[str, Any] = {k: table[k] for k in ("on", "run") if k in table}
            ok = self.action_and_alert(table, inline, path, opts, actions, alerts) and ok
        elif isinstance(sub, list) and all(isinstance(x, dict) for x in sub):
            for i, at in enumerate(sub):
                apath = (*path, "action", i)
                self.fields.check_keys(at, apath, ("on", "run", "alert", "level", *_OPTION_KEYS), "an action")
                aopts = self.fields.options(at, apath, opts) if "run" in at or "alert" not in at else opts
                ok = self.action_and_alert(at, at, apath, aopts, actions, alerts) and ok
        elif sub is not None:
            self.err((*path, "action"), "action must be an array of tables ([[...action]])")
            ok = False
        else:
            self.err(path, "a rule needs on/run or [[...action]] tables")
            ok = False
        name = table.get("name")
        if name is not None and not isinstance(name, str):
            self.err((*path, "name"), f"name must be a string, not {name!r}")
        if not ok or not isinstance(pattern, str):
            return None
        rule_name = (
            name if isinstance(name, str) else f"{os.path.basename(self.filename)}:{self.fields.loc.line(path)}"
        )
        return Rule.make(rule_name, pattern, tuple(ignores), tuple(actions), self.where(path), conc, tuple(alerts))

    def ruleset(
        self, table: dict[str, Any], path: Path, base: ActionOptions, concurrency: int, name: str
    ) -> RuleSet | None:
        self.fields.check_keys(table, path, ("name", "changedfiles", "process", "rule", "user", "group"), "a ruleset")
        # user/group of a rule set: its rules' and its changedfiles file's default (that format cannot say it)
        base = self.fields.options({k: table[k] for k in ("user", "group") if k in table}, path, base)
        rules: list[Rule] = []
        ok = True
        include = table.get("changedfiles")
        if include is not None:
            ok = self.include(include, (*path, "changedfiles"), base, concurrency, rules) and ok
        rule_tables = table.get("rule", [])
        if not isinstance(rule_tables, list) or not all(isinstance(x, dict) for x in rule_tables):
            self.err((*path, "rule"), "rule must be an array of tables ([[...rule]])")
            rule_tables = []
        for i, rt in enumerate(rule_tables):
            r = self.rule(rt, (*path, "rule", i), base, concurrency, i)
            ok = ok and r is not None
            if r is not None:
                rules.append(r)
        pf = self.fields.process(table["process"], (*path, "process")) if "process" in table else ProcessFilter()
        rs_name = table.get("name", name)
        if not isinstance(rs_name, str):
            self.err((*path, "name"), f"name must be a string, not {rs_name!r}")
            rs_name = name
        if not ok:
            return None
        if not rules:
            self.err(path, f"ruleset {rs_name!r} has no rules", "warning")
        return RuleSet(rs_name, tuple(rules), pf, self.where(path))

    def include(
        self, include: Any, path: Path, base: ActionOptions, concurrency: int, rules: list[Rule]
    ) -> bool:
        if not isinstance(include, str):
            self.err(path, f"changedfiles must be a path, not {include!r}")
            return False
        full = include if os.path.isabs(include) else os.path.join(os.path.dirname(self.filename), include)
        if self.read is None:
            self.err(path, "changedfiles includes cannot be read here")
            return False
        try:
            text = self.read(full)
        except UnsafeFileError as e:
            self.err(path, f"refusing to include {e.strerror}")
            return False
        except OSError as e:
            self.err(path, f"cannot read {full}: {e.strerror or e}")
            return False
        self.files.append(full)
        rs, problems = parse_changedfiles(text, full, base, concurrency)
        self.errors.extend(problems)
        if rs is None:
            return False
        rules.extend(rs.rules)
        self.included_targets.extend(rs.replicate)
        return True

    def load(self, doc: dict[str, Any]) -> Config | None:
        self.fields.check_keys(doc, (), _TOP_KEYS, "the top level")
        runner = doc.get("runner", {})
        max_conc, shell = 8, "/bin/sh"
        if not isinstance(runner, dict):
            self.err(("runner",), "runner must be a table")
        else:
            self.fields.check_keys(runner, ("runner",), ("max_concurrency", "shell"), "[runner]")
            max_conc = self.fields.integer(runner, "max_concurrency", ("runner",), 8)
            sh = runner.get("shell", shell)
            if isinstance(sh, str) and os.path.isabs(sh):
                shell = sh
            else:
                self.err(("runner", "shell"), f"shell must be an absolute path, not {sh!r}")
        defaults = doc.get("defaults", {})
        base, concurrency = ActionOptions(), 4
        if not isinstance(defaults, dict):
            self.err(("defaults",), "defaults must be a table")
        else:
            self.fields.check_keys(defaults, ("defaults",), (*_OPTION_KEYS, *_RULE_LEVEL), "[defaults]")
            base = self.fields.options(defaults, ("defaults",), base)
            concurrency = self.fields.integer(defaults, "concurrency", ("defaults",), 4)
        rulesets: list[RuleSet] = []
        ok = True
        if "rule" in doc:
            rs = self.ruleset({"rule": doc["rule"]}, (), base, concurrency, "default")
            ok = rs is not None
            if rs is not None:
                rulesets.append(rs)
        sets = doc.get("ruleset", [])
        if not isinstance(sets, list) or not all(isinstance(x, dict) for x in sets):
            self.err(("ruleset",), "ruleset must be an array of tables ([[ruleset]])")
            sets = []
        for i, st in enumerate(sets):
            rs = self.ruleset(st, ("ruleset", i), base, concurrency, f"ruleset{i + 1}")
            ok = ok and rs is not None
            if rs is not None:
                rulesets.append(rs)
        targets: list[ReplicateTarget] = list(self.included_targets)
        reps = doc.get("replicate", [])
        if not isinstance(reps, list) or not all(isinstance(x, dict) for x in reps):
            self.err(("replicate",), "replicate must be an array of tables ([[replicate]])")
            reps = []
        for i, rt in enumerate(reps):
            target = rt.get("target")
            if not isinstance(target, str) or not target:
                self.err(("replicate", i), "a [[replicate]] table needs 'target' (a string)")
                ok = False
                continue
            opts = {k: v for k, v in rt.items() if k != "target"}
            problems = [p for p in (check_target(target),) if p] + check_options(opts)
            for problem in problems:
                self.err(("replicate", i), problem)
            if problems:
                ok = False
                continue
            targets.append(ReplicateTarget(target, opts, self.where(("replicate", i))))
        outputs: list[OutputSpec] = []
        outs = doc.get("output", [])
        if not isinstance(outs, list) or not all(isinstance(x, dict) for x in outs):
            self.err(("output",), "output must be an array of tables ([[output]])")
            outs = []
        for i, ot in enumerate(outs):
            spec, problems = parse_output(ot)
            for problem in problems:
                self.err(("output", i), problem)
            if spec is not None:
                if any(o.name == spec.name for o in outputs):
                    self.err(("output", i), f"two outputs are named {spec.name!r}; give one a 'name'")
                outputs.append(spec)
        if not any(k in doc for k in ("rule", "ruleset", "replicate")):
            self.err((), "the config has no rules and no replication targets", "warning")
        if not ok or any(e.severity == "error" for e in self.errors):
            return None
        warnings = tuple(e for e in self.errors if e.severity != "error")
        return Config(tuple(rulesets), tuple(targets), max_conc, shell, tuple(self.files), warnings,
                      outputs=tuple(outputs))


_AT_LINE = re.compile(r"\s*\(at line (\d+), column (\d+)\)\s*$")


def parse_toml(
    text: str, filename: str, read: Callable[[str], str] | None = None
) -> tuple[Config | None, list[ConfigError]]:
    """Parse a whole TOML config. ``read`` reads included changedfiles files (None: includes are errors)."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = str(e)
        m = _AT_LINE.search(msg)
        if m is not None:
            return None, [ConfigError(filename, int(m.group(1)), f"{msg[: m.start()]} (column {m.group(2)})")]
        return None, [ConfigError(filename, 0, msg)]
    loader = _Loader(text, filename, read)
    cfg = loader.load(doc)
    return cfg, in_order(loader.errors)
