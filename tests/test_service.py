"""``make install`` and the systemd unit: an install into a temp tree gives a kwatch that runs, the example security
ruleset as /etc/kwatch/kwatch.toml, and a unit that ``systemd-analyze verify`` accepts (it checks the directives and
that ExecStart names an executable). Not checked here: the unit under a running systemd (PID 1 is not systemd on
this machine), so that its sandboxing still lets BPF load is argued in the unit file, not tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_install_into_a_temp_tree(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    dirs = {"PREFIX": tmp_path / "usr", "LIBDIR": tmp_path / "opt/kwatch", "SYSCONFDIR": tmp_path / "etc",
            "UNITDIR": tmp_path / "units"}
    run = subprocess.run(["make", "-C", str(REPO), "install", *(f"{k}={v}" for k, v in dirs.items())],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout + run.stderr
    kwatch = dirs["PREFIX"] / "bin/kwatch"
    unit = dirs["UNITDIR"] / "kwatch.service"
    conf = dirs["SYSCONFDIR"] / "kwatch/kwatch.toml"
    text = unit.read_text()
    assert f"ExecStart={kwatch} run -c {conf} " in text
    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    check = subprocess.run([str(kwatch), "check-config", str(conf)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "8 rule(s)" in check.stdout, check.stderr
    site = next((dirs["LIBDIR"] / "lib").glob("python3*/site-packages/kwatch"))
    assert (site / "capture/kwatch.bpf.o").exists() and (site / "rules/security.toml").exists()
    conf.write_text("# mine\n")
    again = subprocess.run(["make", "-C", str(REPO), "install", *(f"{k}={v}" for k, v in dirs.items())],
                           capture_output=True, text=True, timeout=900)
    assert again.returncode == 0 and conf.read_text() == "# mine\n", "a config of one's own is kept"
