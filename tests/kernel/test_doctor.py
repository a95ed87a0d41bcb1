"""`kwatch doctor` against the real kernel (the host's, and each guest's in the kernel matrix, vagrant/matrix.py).

Its verdicts are cross-checked against what the backends really do here: the backend it says `auto` picks is the one
`open_source(auto)` opens, and a backend it calls usable really delivers an event.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kwatch.capture.base import CaptureFilter
from kwatch.capture.select import BACKENDS, BLIND_SPOTS, blind_spots_key, describe, open_source

pytestmark = pytest.mark.root

KWATCH = str(Path(__file__).resolve().parents[2] / ".venv" / "bin" / "kwatch")
CHECKS = {"root", "BTF", "ring buffer", "tracepoints", "BTF tracepoints", "fentry", "fexit", "bpf in the active LSMs",
          "BPF LSM", "kprobes", "io_uring tracepoints", "io_uring"}


def doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([KWATCH, "doctor", *args], capture_output=True, text=True, timeout=600)


def test_json_names_every_check_and_the_backend_auto_opens(tmp_path: Path) -> None:
    p = doctor("--json", str(tmp_path))
    assert p.returncode == 0, p.stderr
    r = json.loads(p.stdout)
    assert {c["name"] for c in r["checks"]} == CHECKS
    assert all(isinstance(c["ok"], bool) and c["detail"] for c in r["checks"])
    assert set(r["backends"]) == set(BACKENDS)
    warnings: list[str] = []
    src = open_source(CaptureFilter.make(roots=[os.fsencode(tmp_path)]), "auto", warnings.append)
    try:
        assert r["auto"] == src.name, (r["why"], warnings)
        # the BPF program auto took (VFS hooks or syscall tracepoints) is the one the doctor names
        assert r["auto_hooks"] == blind_spots_key(src)
        assert r["blind_spots"] == BLIND_SPOTS[blind_spots_key(src)]
        # auto logs the blind spots of what it chose, as the doctor prints them
        assert any(w.startswith(f"the {describe(src)} backend cannot see: ") for w in warnings), warnings
    finally:
        src.close()
    checks = {c["name"]: c for c in r["checks"]}
    assert checks["BTF"]["ok"] == Path("/sys/kernel/btf/vmlinux").exists()
    # the capture program needs a ring buffer and tracepoints: the doctor cannot call them absent while it loads
    if r["backends"]["bpf"]["ok"]:
        assert checks["ring buffer"]["ok"] and checks["tracepoints"]["ok"], checks
    # the VFS program is taken exactly where the doctor's fentry probe attaches
    if r["auto"] == "bpf":
        assert (r["auto_hooks"] == "bpf-vfs") == checks["fentry"]["ok"], (r["auto_hooks"], checks["fentry"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_called_usable_delivers_an_event(backend: str, tmp_path: Path) -> None:
    r = json.loads(doctor("--json", str(tmp_path)).stdout)
    verdict = r["backends"][backend]
    src = None
    try:
        src = open_source(CaptureFilter.make(roots=[os.fsencode(tmp_path)]), backend)
    except Exception as e:  # the doctor must have said no
        assert not verdict["ok"], f"doctor said {backend} works, opening it failed: {e}"
        return
    try:
        assert verdict["ok"], f"doctor said {backend} does not work ({verdict['detail']}), but it opened"
        # from a child: the BPF backend leaves out kwatch's own process (this one)
        subprocess.run(["mkdir", str(tmp_path / "probe")], check=True)
        from workload import collect

        assert any(e.path == os.fsencode(tmp_path / "probe") for e in collect(src, quiet=1.0))
    finally:
        src.close()


def test_text_says_what_auto_picks_and_what_it_cannot_see(tmp_path: Path) -> None:
    p = doctor(str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "what this kernel allows" in p.stdout
    auto = next(line for line in p.stdout.splitlines() if line.startswith("--backend auto picks "))
    name = auto.split()[3].rstrip(":")
    assert name in BACKENDS
    key = json.loads(doctor("--json", str(tmp_path)).stdout)["auto_hooks"]
    assert key in (name, "bpf-vfs" if name == "bpf" else name)
    for spot in BLIND_SPOTS[key]:
        assert f"  - {spot}" in p.stdout
