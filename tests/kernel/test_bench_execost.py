"""The exec program of the exe-cost benchmark (bench/execost.bpf.c) stores the path /proc shows for a process, for
hostile names too: its costs in docs/benchmarks.md are those of a walk that gives the right answer."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from bench.common import Runner
from bench.execost import check_walk, execloop_binary
from bench.hookcost import bpf_object

NAMES = {
    "plain": b"execloop",
    "spaces and shell": b"exec loop $(touch x) 'q'",
    "newline": b"exec\nloop",
    "not utf-8": b"exec\xff\xfeloop",
}


@pytest.mark.parametrize("name", list(NAMES.values()), ids=list(NAMES))
def test_exec_program_stores_the_path_proc_shows(tmp_path: Path, name: bytes) -> None:
    exe = Path(os.fsdecode(bytes(tmp_path) + b"/" + name))
    shutil.copy(execloop_binary(), exe)
    exe.chmod(0o755)
    runner = Runner()
    try:
        assert check_walk(runner, bpf_object("execost"), exe) == bytes(exe)
    finally:
        runner.close()
