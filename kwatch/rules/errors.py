"""Config errors: what failed, in which file, on which line. Pure.

Loaders collect every problem they find (a config is read whole, not up to its first mistake) and raise one
:class:`ConfigErrors` holding them all; :func:`kwatch.rules.check_config` returns the list instead.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigError:
    """One problem in a config file. ``line`` is 1-based; 0 means the file as a whole (e.g. it cannot be read)."""

    file: str
    line: int
    reason: str
    severity: str = (
        "error"  # "error" makes the config unusable; "warning" is reported and the config still loads
    )

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        prefix = "" if self.severity == "error" else f"{self.severity}: "
        return f"{where}: {prefix}{self.reason}"


def in_order(errors: list[ConfigError]) -> list[ConfigError]:
    """File and line order; problems on one line keep the order they were found in (a stable sort)."""
    return sorted(errors, key=lambda e: (e.file, e.line))


class ConfigErrors(ValueError):
    """A config has at least one error; ``errors`` holds all of them (and the warnings), in file/line order."""

    def __init__(self, errors: list[ConfigError]) -> None:
        self.errors = in_order(errors)
        super().__init__("\n".join(str(e) for e in self.errors))


class UnsafeFileError(PermissionError):
    """A file kwatch must trust (a config, an include, a password file) can be changed by others; ``strerror``
    names the file, who can change it, and the fix (see :mod:`kwatch.filesafety`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(1, reason)  # EPERM
