"""Shared fixtures. Tests that need root and the real kernel are marked ``root`` and skipped with a reason otherwise.

``--no-skips`` (CI's run) turns every skip into a failure of the session, except those in :data:`ALLOWED_SKIPS`
(tests whose condition may truly not apply on a correct machine, each with the reason): a run as non-root, a
missing peer binary or a kernel feature gone would otherwise skip the real-kernel and real-peer tests and stay green.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# the shared support modules (peers the tests start, tree comparison, workloads) import by name
sys.path.insert(0, str(Path(__file__).resolve().parent / "support"))
BPF_OBJECT = REPO / "kwatch" / "capture" / "kwatch.bpf.o"


# node id -> why skipping it does not hide a broken machine
ALLOWED_SKIPS: dict[str, str] = {
    "tests/kernel/test_capture_inotify.py::test_burst_overflow_is_a_marker":
        "a machine whose fs.inotify.max_queued_events holds the whole 60,000-event burst cannot overflow the queue; "
        "the overflow path is then unreachable, not broken",
    # a whole module (every test in it) when the key has no "::"
    "tests/kernel/test_capture_vfs.py":
        "the VFS hooks need fentry, which some kernels refuse (this development VM: EPERM); the tests skip only when "
        "the kernel refuses the tiny fentry probe, and the kernel matrix's guests (make test-kernels) run them",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--no-skips", action="store_true",
                     help="fail the session if a test is skipped (except the allowed ones, tests/conftest.py)")


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("--no-skips") and os.geteuid() != 0:
        raise pytest.UsageError("--no-skips needs root: every test marked root would be skipped")


_SKIPPED: list[tuple[str, str]] = []  # (node id, reason) of every test skipped in this session


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append((report.nodeid, reason))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not session.config.getoption("--no-skips"):
        return
    bad = [(n, r) for n, r in _SKIPPED if n.split("[")[0] not in ALLOWED_SKIPS and n.split("::")[0] not in ALLOWED_SKIPS]
    if bad:
        tr = session.config.pluginmanager.get_plugin("terminalreporter")
        lines = [f"{len(bad)} tests skipped that must run here (--no-skips; allowed: tests/conftest.py ALLOWED_SKIPS):"]
        lines += [f"  {n}: {r}" for n, r in bad]
        if tr is not None:
            tr.ensure_newline()
            tr.write_line("\n".join(lines), red=True, bold=True)
        if session.exitstatus == 0:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (real BPF/fanotify/mounts)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)
