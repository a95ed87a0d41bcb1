"""Reading config files: pick the format, parse, collect every problem. The file I/O of the rules package.

- :func:`load_config` returns a Config or raises :class:`ConfigErrors` listing every error (and warning).
- :func:`check_config` returns that list (empty: the config is fine) for ``kwatch check-config``.
- :func:`load_default_config` reads the embedded ``default.conf``.

The format is TOML when the name ends in ``.toml``; otherwise changedfiles, unless the first statement is
clearly TOML (a ``[table]`` header or ``key = value``) and not a changedfiles keyword.
"""

from __future__ import annotations

import os
import re
from importlib import resources

from kwatch.rules.build import KEYWORDS
from kwatch.rules.changedfiles import parse_changedfiles
from kwatch.rules.errors import ConfigError, ConfigErrors, in_order
from kwatch.rules.model import Config
from kwatch.rules.tomlconf import parse_toml

DEFAULT_CONFIG = "default.conf"

_TOMLISH = re.compile(r"\s*(\[|[A-Za-z0-9_.\"'-]+\s*=)")


def _read(path: str) -> str:
    with open(path, "rb") as f:
        return f.read().decode("utf-8", "surrogateescape")


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
    p = os.fspath(path)
    try:
        text = _read(p)
    except OSError as e:
        return [ConfigError(p, 0, f"cannot read: {e.strerror or e}")]
    return parse_config(text, p)[1]


def load_config(path: str | os.PathLike[str]) -> Config:
    """The config at ``path``; raises ConfigErrors (all of them) when it has any error."""
    p = os.fspath(path)
    try:
        text = _read(p)
    except OSError as e:
        raise ConfigErrors([ConfigError(p, 0, f"cannot read: {e.strerror or e}")]) from None
    cfg, errs = parse_config(text, p)
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
