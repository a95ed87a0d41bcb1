"""What the rsync sender matches a file against and what it makes of it: the receiver's block checksums (SumHead)
and the tokens, literal runs and block matches, that rebuild the file (sender.c, token.c).

Pure data (no numpy): a client that only sends whole files uses these without importing the matcher (match.py).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SumHead:
    """The receiver's block checksums for one file (sender.c receive_sums)."""

    count: int
    blength: int
    s2length: int
    remainder: int
    sum1: tuple[int, ...]
    sum2: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class Literal:
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Match:
    block: int
    offset: int
    length: int


Token = Literal | Match
