"""Shared fixtures. Tests that need root and the real kernel are marked ``root`` and skipped with a reason otherwise."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BPF_OBJECT = REPO / "kwatch" / "capture" / "kwatch.bpf.o"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real BPF/fanotify/mounts)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
