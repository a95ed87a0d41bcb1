"""Reading config files: pick the format, parse, collect every problem. The file I/O of the rules package.

- :func:`load_config` returns a Config or raises :class:`ConfigErrors` listing every error (and warning).
- :func:`check_config` returns that list (empty: the config is fine) for ``kwatch check-config``.
- :func:`load_default_config` reads the embedded ``default.conf``.

A config decides what kwatch runs with its privileges, so files are checked before they are trusted: the config
and every file it includes must be changeable by no one but root or kwatch's own user
(:mod:`kwatch.filesafety`), a replication target's ``password_file`` must not be readable by every user, and
every ``user``/``group`` of an action must exist and be one kwatch can switch to (only root can switch at all).

The format is TOML when the name ends in ``.toml``; otherwise changedfiles, unless the first statement is
clearly TOML (a ``[table]`` header or ``key = value``) and not a changedfiles keyword.
"""

from __future__ import annotations

import os
import re
from importlib import resources

from kwatch.filesafety import unsafe_file
from kwatch.rules.build import KEYWORDS
from kwatch.rules.changedfiles import parse_changedfiles
from kwatch.rules.errors import ConfigError, ConfigErrors, UnsafeFileError, in_order
from kwatch.rules.model import Config
from kwatch.rules.runas import resolve_run_as, switch_problem
from kwatch.rules.tomlconf import parse_toml

DEFAULT_CONFIG = "default.conf"

_TOMLISH = re.compile(r"\s*(\[|[A-Za-z0-9_.\"'-]+\s*=)")


def _read(path: str) -> str:
    problem = unsafe_file(path)
    if problem is not None:
        raise UnsafeFileError(problem)
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


def check_privileges(config: Config) -> list[ConfigError]:
    """Problems with the accounts actions run as and with the replication password files (reads the account
    databases and the files' metadata)."""
    errs: list[ConfigError] = []
    seen: set[tuple[str | None, str | None]] = set()
    for rs in config.rulesets:
        for rule in rs.rules:
            for action in rule.actions:
                key = (action.options.user, action.options.group)
                if key in seen or key == (None, None):
                    continue
                seen.add(key)
                where = action.where
                try:
                    run_as = resolve_run_as(*key)
                except LookupError as e:
                    errs.append(ConfigError(where.file, where.line, f"{e.args[0]} (user/group of this action)"))
                    continue
                problem = switch_problem(run_as) if run_as is not None else None
                if problem is not None:
                    errs.append(ConfigError(where.file, where.line, f"{problem}: run kwatch as root, or drop user/group"))
    for t in config.replicate:
        pf = t.options.get("password_file")
        if not isinstance(pf, str):
            continue
        try:
            problem = unsafe_file(pf, secret=True)
        except OSError as e:
            problem = f"cannot read the password file {pf}: {e.strerror or e}"
        if problem is not None:
            errs.append(ConfigError(t.where.file, t.where.line, f"password_file: {problem}"))
    return errs


def _load(p: str) -> tuple[Config | None, list[ConfigError]]:
    try:
        text = _read(p)
    except UnsafeFileError as e:
        return None, [ConfigError(p, 0, f"refusing to load {e.strerror}")]
    except OSError as e:
        return None, [ConfigError(p, 0, f"cannot read: {e.strerror or e}")]
    cfg, errs = parse_config(text, p)
    if cfg is None:
        return None, errs
    problems = check_privileges(cfg)
    if problems:
        return None, in_order(errs + problems)
    return cfg, errs


def looks_like_toml(path: str, text: str) -> bool:
    if path.endswith(".toml"):
        return True
    for line in text.split("\n"):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        word = s.split()[0]
        return word not in (*KEYWORDS, "RULE", "IGNORE") and _TOMLISH.match(s) is not None
    return False


def parse_config(
    text: str, filename: str, toml: bool | None = None
) -> tuple[Config | None, list[ConfigError]]:
    """Parse config text; ``toml`` None: decide from the name and the text."""
    if toml is None:
        toml = looks_like_toml(filename, text)
    if toml:
        return parse_toml(text, filename, read=_read)
    rs, errs = parse_changedfiles(text, filename)
    if rs is None:
        return None, in_order(errs)
    warnings = tuple(e for e in errs if e.severity != "error")
    return Config((rs,), rs.replicate, files=(filename,), warnings=warnings), in_order(errs)


def check_config(path: str | os.PathLike[str]) -> list[ConfigError]:
    """Every error and warning in the config at ``path`` (and the files it includes), in file/line order."""
    return _load(os.fspath(path))[1]


def load_config(path: str | os.PathLike[str]) -> Config:
    """The config at ``path``; raises ConfigErrors (all of them) when it has any error."""
    cfg, errs = _load(os.fspath(path))
    if cfg is None:
        raise ConfigErrors(errs)
    return cfg


def load_default_config() -> Config:
    """The embedded default config (harmless: it prints changes under /tmp/kwatch-demo)."""
    res = resources.files("kwatch.rules").joinpath(DEFAULT_CONFIG)
    text = res.read_bytes().decode("utf-8", "surrogateescape")
    cfg, errs = parse_config(text, f"<kwatch>/{DEFAULT_CONFIG}", toml=False)
    if cfg is None:
        raise ConfigErrors(errs)
    return cfg
