"""``make install`` and the systemd unit: an install into a temp tree gives a kwatch that runs, the example security
ruleset as /etc/kwatch/kwatch.toml, and a unit that ``systemd-analyze verify`` accepts (it checks the directives and
that ExecStart names an executable). Not checked here: the unit under a running systemd (PID 1 is not systemd on
this machine), so that its sandboxing still lets BPF load is argued in the unit file, not tested."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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


@pytest.mark.slow
@pytest.mark.root
def test_pip_install_into_a_fresh_venv_gives_a_working_kwatch(tmp_path: Path) -> None:
    """``pip install .`` of a tree without any built file (the tracked files only, as a fresh clone has them) builds
    the C extension and the BPF object, and the installed kwatch captures with BPF and its C decoder."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True, check=True).stdout
    for name in files.decode().split("\0"):
        if name and (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    assert not (src / "kwatch/capture/kwatch.bpf.o").exists()
    venv = tmp_path / "venv"
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin/python"), "-m", "pip", "install", "-q", str(src)], capture_output=True,
                         text=True, timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr
    probe = subprocess.run(
        [str(venv / "bin/python"), "-c",
         "import kwatch.capture.record as r, importlib.resources as res; "
         "print(r.recordc is not None and r.recordc.__file__.endswith('.so')); "
         "print(res.files('kwatch.capture').joinpath('kwatch.bpf.o').is_file())"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert probe.returncode == 0 and probe.stdout.split() == ["True", "True"], probe.stdout + probe.stderr
    watched = tmp_path / "w"
    watched.mkdir()
    trace = subprocess.Popen([str(venv / "bin/kwatch"), "trace", str(watched), "--backend", "bpf", "--json",
                              "--count", "1", "--duration", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             cwd=tmp_path)
    assert trace.stderr is not None
    ready = trace.stderr.readline()
    assert b"with the bpf backend" in ready, ready
    (watched / "f").write_bytes(b"x")
    out, err = trace.communicate(timeout=300)
    assert b'"path":"%s"' % str(watched / "f").encode() in out, out + err
