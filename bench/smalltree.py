"""A deterministic tree of many small files (issue 19's "1,000,000 small files" first-sync target): made here, not
downloaded, the same bytes every time for a given count and seed.

Layout: ``dNNN/sNN/fNNNNNN``, 1,000 files per leaf directory, 10 leaves per top directory (1,000,000 files are
100 x 10 directories). Sizes are drawn uniformly from 0..4095 bytes (a seeded ``random.Random``), contents are its
``randbytes`` (incompressible: no transport gains by compressing them). On a tmpfs each non-empty file takes a 4 KiB
page plus its inode: about 5 GB for a million files, source and mirror about 10 GB.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path

PER_DIR = 1000
LEAVES_PER_TOP = 10
MAX_SIZE = 4096
SEED = 19  # issue 19


@dataclass(frozen=True)
class SmallTree:
    files: int
    dirs: int
    bytes: int
    seed: int

    def describe(self) -> dict[str, object]:
        return {"kind": "small files", "files": self.files, "dirs": self.dirs, "bytes": self.bytes, "seed": self.seed,
                "max_size": MAX_SIZE - 1, "per_dir": PER_DIR}


def make_small_tree(root: Path, files: int, seed: int = SEED) -> SmallTree:
    """Write ``files`` small files under ``root`` (which must exist and be empty); what was written."""
    rng = random.Random(seed)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    total = 0
    dirs = 0
    top = -1
    for leaf in range(-(-files // PER_DIR)):
        if leaf % LEAVES_PER_TOP == 0:
            top += 1
            os.mkdir(root / f"d{top:03d}")
            dirs += 1
        here = root / f"d{top:03d}" / f"s{leaf % LEAVES_PER_TOP:02d}"
        os.mkdir(here)
        dirs += 1
        dfd = os.open(here, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for i in range(leaf * PER_DIR, min(files, (leaf + 1) * PER_DIR)):
                data = rng.randbytes(rng.randrange(MAX_SIZE))
                fd = os.open(f"f{i:07d}", flags, 0o644, dir_fd=dfd)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
                total += len(data)
        finally:
            os.close(dfd)
    return SmallTree(files, dirs, total, seed)
