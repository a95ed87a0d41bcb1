"""The kernel matrix's runner (vagrant/matrix.py): what it says and does when a kernel cannot be fetched or a guest
fails, which CI meets only when something is already wrong."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("matrix", Path(__file__).parents[2] / "vagrant" / "matrix.py")
assert _spec and _spec.loader
matrix = importlib.util.module_from_spec(_spec)
sys.modules["matrix"] = matrix  # dataclasses look their module up
_spec.loader.exec_module(matrix)


@pytest.mark.skipif(shutil.which("apt-get") is None, reason="apt-get: Debian only")
def test_a_version_the_archive_does_not_have_stops_with_what_to_change(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A pinned version apt cannot find (Debian replaces a security-updated kernel's package) ends the run with a
    message naming the kernel, the package and version, and the file to change, not a traceback; nothing is left
    in the cache."""
    monkeypatch.setattr(matrix, "CACHE", tmp_path)
    k = matrix.Kernel("6.1", "linux-image-6.1.0-57-amd64", "0.0-no-such-version")
    with pytest.raises(SystemExit) as e:
        matrix.fetch(k)
    msg = str(e.value)
    assert msg.startswith("kernel 6.1: cannot fetch linux-image-6.1.0-57-amd64=0.0-no-such-version from ")
    assert str(matrix.KERNELS_FILE) in msg
    assert not k.dir.exists()


def test_a_guest_is_booted_again_only_when_it_failed_to_start_in_time() -> None:
    """A guest that never ran its script is booted once more; one stopped at its deadline is not (a second boot
    would double the time CI waits), nor one that ran, nor one killed."""
    assert matrix.boot_again(ran=False, rc=255)
    assert not matrix.boot_again(ran=False, rc=matrix.GUEST_TIMED_OUT)
    assert not matrix.boot_again(ran=True, rc=1)
    assert not matrix.boot_again(ran=False, rc=-9)  # killed: SIGTERM's handler stopped it


def test_no_guest_starts_once_the_run_is_told_to_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """After SIGTERM (make interrupted, CI's deadline) no guest is booted again or started: a worker thread that saw
    its guest killed started another one that outlived the run."""
    monkeypatch.setattr(matrix, "_STOPPING", matrix.threading.Event())
    assert matrix.boot_again(ran=False, rc=255)
    matrix._STOPPING.set()
    assert not matrix.boot_again(ran=False, rc=255)
