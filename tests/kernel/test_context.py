"""Who did it (kwatch.context): the pure parts, and each field of a real process's record checked against /proc.

The live test runs ``kwatch trace --json`` on a real backend while a child process, kept alive until its record is
read, does what an audit trail must see through: it sets its login uid (as ``pam_loginuid`` does at login), moves
into a cgroup of its own named like a docker container's, enters a mount namespace of its own, and drops to another
uid and gid with ``setresuid`` (as ``sudo -u`` does) before it writes a file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from kwatch.context import ContextFilter, ProcInfo, Resolver, cgroup2_root, container_of, unit_of
from kwatch.events import FileEvent, Op
from kwatch.outputs.record import event_data, event_line, rfc3339
from kwatch.rules.match import config_alerts
from kwatch.rules.tomlconf import parse_toml
from kwatch.trace import TraceMatcher, compile_path_regex, format_json

H = "0123456789abcdef" * 4

CONTAINER_CASES = [
    ("docker systemd driver", f"/system.slice/docker-{H}.scope", ("docker", H)),
    ("docker cgroupfs driver", f"/docker/{H}", ("docker", H)),
    ("containerd CRI", f"/kubepods.slice/kubepods-burstable.slice/kubepods-pod1.slice/cri-containerd-{H}.scope",
     ("containerd", H)),
    ("kubepods cgroupfs", f"/kubepods/burstable/pod1234/{H}", ("containerd", H)),
    ("CRI-O", f"/kubepods.slice/crio-{H}.scope", ("crio", H)),
    ("podman", f"/machine.slice/libpod-{H}.scope", ("podman", H)),
    ("podman conmon is not the container", f"/machine.slice/libpod-conmon-{H}.scope", None),
    ("lxc", "/lxc.payload.web1/init.scope", ("lxc", "web1")),
    ("a service", "/system.slice/ssh.service", None),
    ("a bare id with no runtime parent", f"/user.slice/{H}", None),
    ("root", "/", None),
]


@pytest.mark.parametrize(("name", "cgroup", "want"), CONTAINER_CASES, ids=[c[0] for c in CONTAINER_CASES])
def test_container_of(name: str, cgroup: str, want: tuple[str, str] | None) -> None:
    assert container_of(cgroup) == want


def test_unit_of() -> None:
    assert unit_of("/system.slice/nginx.service") == "nginx.service"
    assert unit_of("/user.slice/user-1000.slice/session-3.scope") == "session-3.scope"
    assert unit_of(f"/system.slice/docker-{H}.scope") == f"docker-{H}.scope"
    assert unit_of("/user.slice") is None and unit_of("/") is None


def test_cgroup2_root_of_a_hybrid_and_a_unified_system(tmp_path: Path) -> None:
    hybrid = tmp_path / "hybrid"
    hybrid.write_text("25 1 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
                      "26 25 0:23 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n"
                      "27 25 0:24 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n")
    unified = tmp_path / "unified"
    unified.write_text("30 1 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n")
    none = tmp_path / "none"
    none.write_text("22 1 0:21 / / rw - ext4 /dev/sda1 rw\n")
    assert cgroup2_root(str(hybrid)) == "/sys/fs/cgroup/unified"
    assert cgroup2_root(str(unified)) == "/sys/fs/cgroup"
    assert cgroup2_root(str(none)) is None


def test_record_line_and_dict_agree_with_context() -> None:
    ev = FileEvent(Op.CREATE, b"/d/\xff x", pid=5, uid=0, comm=b"sh", backend="bpf")
    info = ProcInfo(exe=b"/usr/bin/\xffsh", auid=1000, ses=3, pcomm=b"sshd", user="root", group="root",
                    cgroup=f"/system.slice/docker-{H}.scope", container=H, runtime="docker",
                    unit=f"docker-{H}.scope", mntns=4026531841, foreign_mntns=True)
    line = event_line(ev, rfc3339(1_700_000_000_000_000_000), "h", info)
    assert json.loads(line) == event_data(ev, 1_700_000_000_000_000_000, "h", info)
    d = json.loads(line)
    assert d["exe"].encode("utf-8", "surrogateescape") == b"/usr/bin/\xffsh"
    assert (d["auid"], d["ses"], d["pcomm"], d["container"], d["runtime"]) == (1000, 3, "sshd", H, "docker")
    assert json.loads(event_line(ev, "t", "h", ProcInfo())) == json.loads(event_line(ev, "t", "h")), \
        "unknown fields are left out"


def test_context_filters_need_the_context_and_match_it() -> None:
    ev = FileEvent(Op.CREATE, b"/d/f", pid=5, comm=b"sh", backend="bpf")
    info = ProcInfo(exe=b"/usr/bin/dash", auid=1000, user="mike", cgroup="/system.slice/x.service",
                    container=H, runtime="docker")
    cases = [
        (ContextFilter(exes=(compile_path_regex("dash$"),)), True),
        (ContextFilter(exes=(compile_path_regex("bash$"),)), False),
        (ContextFilter(exclude_exes=(compile_path_regex("^/usr/bin/"),)), False),
        (ContextFilter(auids=frozenset({1000})), True),
        (ContextFilter(auids=frozenset({0})), False),
        (ContextFilter(users=frozenset({"mike"})), True),
        (ContextFilter(containers=(H[:12],)), True),
        (ContextFilter(containers=("docker",)), True),
        (ContextFilter(containers=("podman",)), False),
        (ContextFilter(cgroups=(re.compile(r"^/system\.slice/"),)), True),
        (ContextFilter(auids=frozenset({1000}), users=frozenset({"root"})), False),
    ]
    for f, want in cases:
        assert TraceMatcher(context=f, resolve=lambda e: info)(ev) is want, f
    assert TraceMatcher(context=ContextFilter(auids=frozenset({1000})), resolve=lambda e: ProcInfo())(ev) is False, \
        "an unknown login uid matches no --auid"
    assert ContextFilter(auids=frozenset({1000})).accepts(None) is False, "a process looked up too late: unknown"
    assert ContextFilter(exclude_exes=(compile_path_regex("x"),)).accepts(None) is True, "excludes drop what they see"
    assert "exe" not in json.loads(format_json(ev)) and json.loads(format_json(ev, info))["exe"] == "/usr/bin/dash"


def test_a_context_filter_is_empty_only_without_any_field() -> None:
    # ``empty`` is a fast test (asked per event): each field, set alone, must make it non-empty
    values = {"exes": (compile_path_regex("x"),), "exclude_exes": (compile_path_regex("x"),),
              "auids": frozenset({0}), "users": frozenset({"root"}), "containers": ("docker",),
              "cgroups": (re.compile("x"),)}
    assert {f.name for f in dataclasses.fields(ContextFilter)} == set(values), "a new field needs a case here"
    assert ContextFilter().empty
    for name, value in values.items():
        assert not ContextFilter(**{name: value}).empty, name


RULES = """
[[ruleset]]
name = "web"
[ruleset.process]
exe = ['/(ba|da)?sh$']
exclude_exe = ['^/usr/sbin/']
container = ["docker"]
[[ruleset.rule]]
name = "webroot"
match = '^/srv/www/'
on = ["OPENW"]
alert = "a shell wrote into a web root"
"""


class Procs:
    def __init__(self, info: ProcInfo | None) -> None:
        self.info = info

    def ancestry(self, pid: int) -> list[tuple[int, bytes]]:
        return []

    def context(self, ev: FileEvent) -> ProcInfo | None:
        return self.info


def test_rules_filter_on_the_process_context() -> None:
    cfg, errs = parse_toml(RULES, "r.toml")
    assert cfg is not None and not errs, errs
    ev = FileEvent(Op.CLOSE_WRITE, b"/srv/www/index.php", pid=9, comm=b"sh", backend="bpf")
    shell_in_docker = ProcInfo(exe=b"/usr/bin/dash", container=H, runtime="docker")
    assert [a.rule_name for a in config_alerts(cfg, ev, Procs(shell_in_docker))] == ["webroot"]
    assert config_alerts(cfg, ev, Procs(ProcInfo(exe=b"/usr/bin/dash"))) == [], "not in a container"
    assert config_alerts(cfg, ev, Procs(ProcInfo(exe=b"/usr/bin/php", container=H, runtime="docker"))) == [], "not a shell"
    assert config_alerts(cfg, ev, Procs(ProcInfo(exe=b"/usr/sbin/sh", container=H, runtime="docker"))) == [], "excluded"
    assert config_alerts(cfg, ev, Procs(None)) == [], "an unknown context passes no include filter"


def test_rules_context_filter_errors_name_the_line() -> None:
    text = RULES.replace("exclude_exe = ['^/usr/sbin/']", "exclude_exe = ['(']").replace(
        'container = ["docker"]', "container = 5")
    _cfg, errs = parse_toml(text, "r.toml")
    msgs = [(e.line, e.reason) for e in errs]
    assert any(line == 6 and "bad regex" in m for line, m in msgs), msgs
    assert any(line == 7 and "container" in m for line, m in msgs), msgs


def test_resolver_looks_a_process_up_once_and_again_after_an_exec() -> None:
    r = Resolver()
    me = os.getpid()
    comm = Path(f"/proc/{me}/comm").read_bytes().strip()
    ev = FileEvent(Op.CREATE, b"/x", pid=me, ppid=os.getppid(), uid=os.getuid(), gid=os.getgid(), comm=comm)
    a = r(ev)
    assert a is not None and a.exe == os.readlink(f"/proc/{me}/exe").encode()
    for _ in range(100):
        assert r(ev) is a
    assert r.lookups == 1
    r(ev._replace(comm=b"after-exec"))
    assert r.lookups == 2, "a new comm (an execve) is looked up again"
    gone = r(FileEvent(Op.CREATE, b"/x", pid=2**22 + 12345, uid=0, comm=b"gone"))
    assert gone is not None and gone.exe is None and gone.auid is None and gone.user == "root"


CHILD = r"""
import ctypes, os, sys
cg, target, auid = sys.argv[1], sys.argv[2], sys.argv[3]
with open(os.path.join(cg, "cgroup.procs"), "w") as f:
    f.write(str(os.getpid()))
with open("/proc/self/loginuid", "w") as f:  # what pam_loginuid does at login: sudo and su keep it
    f.write(auid)
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x00020000) != 0:  # CLONE_NEWNS: a mount namespace of its own
    raise OSError(ctypes.get_errno(), "unshare")
os.setresgid(65534, 65534, 65534)
os.setresuid(65534, 65534, 65534)
with open(target, "wb") as f:
    f.write(b"x")
print(os.getpid(), flush=True)
sys.stdin.read()  # alive until the test has read the record
"""


@pytest.mark.root
@pytest.mark.parametrize("backend", ["bpf", "fanotify"])
def test_each_field_of_a_real_record_matches_proc(backend: str, tmp_path: Path) -> None:
    root = cgroup2_root()
    assert root is not None, "no cgroup v2 hierarchy mounted"
    d = Path(tempfile.mkdtemp(prefix="kwatch-context-"))  # pytest's tmp_path is root's only: the child drops to nobody
    os.chmod(d, 0o777)
    cid = (uuid.uuid4().hex * 2)[:64]
    parent = Path(root) / f"kwatch-test-{os.getpid()}"
    cg = parent / f"docker-{cid}.scope"
    cg.mkdir(parents=True)
    err_path = tmp_path / "trace.err"
    child = None
    try:
        with open(err_path, "wb") as err_file:
            trace = subprocess.Popen(
                [sys.executable, "-m", "kwatch", "trace", str(d), "--json", "--backend", backend, "--op", "create",
                 "--container", cid[:12], "--count", "1", "--duration", "300"],
                stdout=subprocess.PIPE, stderr=err_file)
        deadline = time.monotonic() + 120
        while f"with the {backend} backend".encode() not in err_path.read_bytes():
            assert trace.poll() is None, err_path.read_bytes()
            assert time.monotonic() < deadline, err_path.read_bytes()
            time.sleep(0.05)
        (d / "not-in-the-container").write_bytes(b"filtered out by --container")
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(cg), str(d / "f"), "4242"],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        proc_exe = os.readlink(f"/proc/{pid}/exe")
        proc_mntns = os.stat(f"/proc/{pid}/ns/mnt").st_ino
        out, _ = trace.communicate(timeout=300)
    finally:
        if child is not None:
            child.communicate(b"")
        shutil.rmtree(d)
        for p in (cg, parent):
            for _ in range(100):  # the cgroup is busy until its last process has been reaped
                try:
                    p.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
    lines = out.splitlines()
    assert len(lines) == 1, (out, err_path.read_bytes())
    rec = json.loads(lines[0])
    assert rec["pid"] == pid and rec["path"] == str(d / "f")
    assert rec["exe"] == proc_exe
    assert rec["auid"] == 4242, "the login uid survives setresuid"
    assert isinstance(rec["ses"], int)
    assert rec["cgroup"] == f"/kwatch-test-{os.getpid()}/docker-{cid}.scope"
    assert (rec["container"], rec["runtime"]) == (cid, "docker")
    assert rec["mntns"] == proc_mntns and rec["foreign_mntns"] is True
    if backend == "bpf":  # fanotify records no uid, gid or parent
        assert (rec["uid"], rec["user"], rec["gid"], rec["group"]) == (65534, "nobody", 65534, "nogroup")
        assert rec["pcomm"] == Path(f"/proc/{os.getpid()}/comm").read_text().strip()
