"""Which processes of a ``kwatch replicate --once`` run import a module (the replicator and the agent it starts).

A sitecustomize on PYTHONPATH, which the agent inherits, notes each process's start and any import of the module in
a file named by the environment. Over ssh the remote agent gets neither: only local processes are seen.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_PROBE = """\
import os
import sys

def _note(what):
    with open(os.environ["KWATCH_IMPORT_LOG"], "a") as f:
        f.write(f"{os.getpid()} {what}\\n")

class _Watch:
    def find_spec(self, name, path=None, target=None):
        if name == os.environ["KWATCH_IMPORT_WATCH"]:
            _note("imported")
        return None

_note("started")
sys.meta_path.insert(0, _Watch())
"""


def run_probed(tmp_path: Path, argv: list[str], module: str) -> tuple[int, set[str]]:
    """Run ``argv`` (it must succeed) with the probe; return how many Python processes started and the pids of those
    that imported ``module``. The probe's log is ``tmp_path / "imports.log"`` while it runs."""
    probe = tmp_path / "importprobe"
    probe.mkdir(exist_ok=True)
    (probe / "sitecustomize.py").write_text(_PROBE)
    log = tmp_path / "imports.log"
    log.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(probe), os.environ.get("PYTHONPATH")])),
           "KWATCH_IMPORT_LOG": str(log), "KWATCH_IMPORT_WATCH": module}
    res = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr
    notes = [line.split(" ", 1) for line in log.read_text().splitlines()]
    return len({pid for pid, what in notes if what == "started"}), {pid for pid, what in notes if what == "imported"}


def once_importing(tmp_path: Path, src: Path, target: str, module: str) -> tuple[int, set[str]]:
    """Run ``kwatch replicate --once src target``; return how many processes started and which imported ``module``."""
    return run_probed(tmp_path, [sys.executable, "-m", "kwatch", "replicate", "--once", str(src), target], module)
