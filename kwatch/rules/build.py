"""Building checked Actions from what a config file says; shared by both config formats. Pure.

Every check that concerns the command (placeholder contexts, batch consistency, commands that hand their
arguments to another shell) lives here, so both formats report the same problems in the same words.
"""

from __future__ import annotations

import re

from kwatch.events import OP_BY_LABEL, Op
from kwatch.rules.errors import ConfigError
from kwatch.rules.model import KEYWORD_OPS, Action, ActionOptions, BatchMode, Where
from kwatch.rules.shell import FILES, ShellSyntaxError, compile_command

KEYWORDS = tuple(KEYWORD_OPS)

# Commands that pass their arguments to another shell, which then parses the name as code:
# ssh joins its arguments into one string for the remote shell; eval and "sh -c" parse their argument.
_RESHELL = re.compile(r"(?:^|[;&|(`]|\$\()\s*(?:exec\s+)?(ssh|rsh|eval|(?:ba|da|z)?sh\s+-c)\b")
_UNQUOTED_FOR_SHELL = ("_FILE_", "_OLD_FILE_", "_NEW_FILE_")


def parse_trigger(word: str) -> frozenset[Op] | None:
    """The ops of a keyword (OPENW, ...) or of a raw op written ``op:<label>`` (``op:open_write``)."""
    if word in KEYWORD_OPS:
        return KEYWORD_OPS[word]
    if word.startswith("op:") and word[3:] in OP_BY_LABEL and word[3:] != "loss":
        return frozenset({OP_BY_LABEL[word[3:]]})
    return None


def make_action(
    triggers: tuple[str, ...], command: str, options: ActionOptions, where: Where, column: int = 0
) -> tuple[Action | None, list[ConfigError]]:
    """A checked Action, or None and the errors. Warnings come back in the list too, with a usable Action."""
    errs: list[ConfigError] = []

    def err(reason: str, severity: str = "error") -> None:
        errs.append(ConfigError(where.file, where.line, reason, severity))

    ops: set[Op] = set()
    for t in triggers:
        got = parse_trigger(t)
        if got is None:
            err(f"unknown operation {t!r} (expected one of {', '.join(KEYWORDS)}, or op:<event op>)")
        else:
            ops |= got
    if not triggers:
        err("no operation given (expected one of " + ", ".join(KEYWORDS) + ")")
    if not command.strip():
        err(f"{'/'.join(triggers) or 'action'}: empty command")
        return None, errs
    try:
        compiled = compile_command(command)
    except ShellSyntaxError as e:
        err(f"command: {e.reason} (column {column + e.offset + 1})")
        return None, errs
    if options.batch is not BatchMode.OFF and compiled.uses_single:
        used = ", ".join(sorted(p for p in compiled.placeholders if p != FILES))
        err(
            f"{used} cannot be used in a batch action (one command gets many files): use _FILES_ with "
            'batch = "args", or read NUL-separated paths from stdin with batch = "stdin"'
        )
    if options.batch is BatchMode.STDIN and compiled.uses_files:
        err(
            '_FILES_ is empty with batch = "stdin" (the files arrive on stdin); use batch = "args" for arguments'
        )
    if options.batch is BatchMode.ARGS and not compiled.uses_files and '"$@"' not in command:
        err(
            'batch = "args" passes the files as arguments, but the command uses neither _FILES_ nor "$@"',
            "warning",
        )
    m = _RESHELL.search(command)
    if m is not None and any(p in compiled.placeholders for p in _UNQUOTED_FOR_SHELL):
        err(
            f"{m.group(1).split()[0]} hands its arguments to another shell, which would parse the file name as code; "
            "use _QFILE_/_QOLD_FILE_/_QNEW_FILE_ (the name quoted for a shell) in that part",
            "warning",
        )
    if any(e.severity == "error" for e in errs):
        return None, errs
    return Action(triggers, frozenset(ops), compiled, options, where), errs
