"""The changedfiles config format, read unchanged, into one RuleSet. Pure (the caller reads the file).

Grammar, one statement per logical line::

    # a comment (only as the first non-blank character of a line; '#' elsewhere belongs to the regex or command)
    RULE <regex>                 start a rule; the regex is searched in the absolute path
    IGNORE <regex>               paths of the current rule that this regex finds are excluded
    <KEYWORD> <shell command>    run the command when the keyword's operation happens to a matching path

    REPLICATE <target> [k=v...]  keep a mirror of the directory the current RULE names (see kwatch.rules.replication)

Keywords: OPENW MKDIR SYMLINK UNLINK RMDIR RENAME (the original set) and CLOSEW CREATE ATTRIB LINK TRUNCATE ANY;
what each fires on is in :mod:`kwatch.rules.model` (OPENW fires once the writer has closed the file). The command
is shell code with the placeholders ``_FILE_``, ``_OLD_FILE_``, ``_NEW_FILE_`` (see :mod:`kwatch.rules.shell`).

A line that ends in an odd number of backslashes continues on the next one; the backslash and the newline are
removed, as ``sh`` does, so write the space before the backslash. The statement's line is the one it starts on.
Keywords are upper case. The regex and the command are taken from after the whitespace that follows the keyword up
to the end of the line, trailing whitespace removed. The file is UTF-8; other bytes pass through unchanged
(surrogateescape), so a regex can name a non-UTF-8 path.

Options the format cannot express (debounce, timeouts, batch, concurrency) take the defaults the caller passes;
the TOML format can set them, and can include a changedfiles file in a rule set.
"""

from __future__ import annotations

import os
import re

from kwatch.rules.build import KEYWORDS, make_action
from kwatch.rules.errors import ConfigError
from kwatch.rules.model import Action, ActionOptions, ReplicateTarget, Rule, RuleSet, Where
from kwatch.rules.prefix import rule_directory
from kwatch.rules.replication import check_options, check_target, parse_replicate_line

_STATEMENT = re.compile(r"[ \t]*(\S+)(?:[ \t]+(.*?))?[ \t\r]*\Z", re.S)


def logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, text) of each logical line, continuations joined."""
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for n, raw in enumerate(text.split("\n"), 1):
        line = raw[:-1] if raw.endswith("\r") else raw
        if not pending:
            start = n
        trailing = len(line) - len(line.rstrip("\\"))
        if trailing % 2 == 1:
            pending.append(line[:-1])
            continue
        pending.append(line)
        out.append((start, "".join(pending)))
        pending = []
    if pending:
        out.append((start, "".join(pending)))
    return out


def _regex_problem(keyword: str, arg: str) -> str | None:
    """Why ``arg`` cannot be the regex of a RULE/IGNORE line, or None."""
    if not arg:
        return f"{keyword} needs a regex"
    try:
        re.compile(arg.encode("utf-8", "surrogateescape"))
    except re.error as e:
        return f"bad regex {arg!r}: {e}"
    return None


def _replicate(arg: str, rule_pattern: str, where: Where) -> tuple[ReplicateTarget | None, list[str]]:
    """The target of a REPLICATE line under the RULE ``rule_pattern`` (its source is the rule's directory), or None
    and why not."""
    source = rule_directory(rule_pattern)
    target, ropts, problems = parse_replicate_line(arg)
    if source is None:
        problems.append(
            f"REPLICATE needs a RULE that names a whole directory, like ^/srv/data(/|$); {rule_pattern!r} does not"
        )
    else:
        ropts.setdefault("source", os.fsdecode(source))
    if target and not problems:
        problems += [p for p in (check_target(target),) if p] + check_options(ropts)
    return (None if problems else ReplicateTarget(target, ropts, where)), problems


def _unknown_keyword(word: str) -> str:
    hint = f" (keywords are upper case: {word.upper()})" if word.upper() in (*KEYWORDS, "RULE", "IGNORE") else ""
    return f"unknown keyword {word!r}{hint}; expected RULE, IGNORE, REPLICATE or one of {', '.join(KEYWORDS)}"


def parse_changedfiles(
    text: str, filename: str, options: ActionOptions | None = None, concurrency: int = 4
) -> tuple[RuleSet | None, list[ConfigError]]:
    """Parse a whole changedfiles text. Returns the rule set (None when there are errors) and every problem."""
    opts = options if options is not None else ActionOptions()
    errs: list[ConfigError] = []
    rules: list[Rule] = []
    targets: list[ReplicateTarget] = []
    replicating: set[int] = set()  # lines of the RULEs that have a REPLICATE
    # The rule being read: (where, pattern, ignores, actions, ok)
    cur: tuple[Where, str, list[str], list[Action], list[bool]] | None = None

    def close() -> None:
        if cur is None:
            return
        where, pattern, ignores, actions, ok = cur
        if not ok[0]:
            return
        if not actions and where.line not in replicating:
            errs.append(ConfigError(where.file, where.line, f"RULE {pattern} has no actions", "warning"))
        rule_name = f"{os.path.basename(filename)}:{where.line}"
        rules.append(Rule.make(rule_name, pattern, tuple(ignores), tuple(actions), where, concurrency))

    for lineno, line in logical_lines(text):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        m = _STATEMENT.match(line)
        assert m is not None  # a non-blank line always has a first word
        word, arg = m.group(1), m.group(2) or ""
        where = Where(filename, lineno)
        if word == "RULE":
            close()
            cur = (where, arg, [], [], [True])
            problem = _regex_problem("RULE", arg)
            if problem:
                errs.append(ConfigError(filename, lineno, problem))
                cur[4][0] = False
            continue
        if word in ("IGNORE", "REPLICATE", *KEYWORDS) and cur is None:
            errs.append(ConfigError(filename, lineno, f"{word} before the first RULE"))
            continue
        if word == "REPLICATE":
            assert cur is not None
            replicate, rproblems = _replicate(arg, cur[1], where)
            errs.extend(ConfigError(filename, lineno, problem) for problem in rproblems)
            if replicate is None:
                cur[4][0] = False
            else:
                targets.append(replicate)
                replicating.add(cur[0].line)  # a rule whose only action is REPLICATE is not empty
            continue
        if word == "IGNORE" or word in KEYWORDS:
            assert cur is not None
            if word == "IGNORE":
                problem = _regex_problem("IGNORE", arg)
                if problem:
                    errs.append(ConfigError(filename, lineno, problem))
                    cur[4][0] = False
                else:
                    cur[2].append(arg)
                continue
            column = line.find(arg) if arg else 0
            action, problems = make_action((word,), arg, opts, where, column)
            errs.extend(problems)
            if action is None:
                cur[4][0] = False
            else:
                cur[3].append(action)
            continue
        errs.append(ConfigError(filename, lineno, _unknown_keyword(word)))
    close()
    if any(e.severity == "error" for e in errs):
        return None, errs
    return RuleSet(os.path.basename(filename), tuple(rules), where=Where(filename, 0), replicate=tuple(targets)), errs
