"""The example security ruleset (kwatch/rules/security.toml): each rule raised by what it is for, and not by what it
must let through; first as pure matching over events, then live: ``kwatch run`` on the BPF backend, real processes
doing each operation, the alerts read back from a file output.

To leave the real /etc alone, the tests rewrite the ruleset's anchors: every ``match = '^/...`` becomes
``'^<prefix>/...``, with a temp directory as prefix holding etc/, home/, usr/bin/, var/www/, var/log/... The
regexes after the anchor, the process filters and the ops are the shipped ones.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path

import pytest

from kwatch.events import FileEvent, Op
from kwatch.rules import Config, parse_config
from kwatch.rules.match import config_alerts

KWATCH = [sys.executable, "-c", "import sys; from kwatch.cli import main; sys.exit(main())"]
P = "/T"  # the prefix of the pure cases


def ruleset_text() -> str:
    return resources.files("kwatch.rules").joinpath("security.toml").read_text()


def rooted(prefix: str, extra: str = "") -> str:
    text = ruleset_text()
    n = text.count("match = '^/")
    assert n == 8, "every rule of the ruleset is anchored at /"
    return text.replace("match = '^/", f"match = '^{re.escape(prefix)}/") + extra


def config(prefix: str) -> Config:
    cfg, errs = parse_config(rooted(prefix), "security.toml")
    assert cfg is not None, errs
    return cfg


class Procs:
    """A process tree for the pure cases: pid -> ancestry."""

    def __init__(self, chains: dict[int, Sequence[tuple[int, bytes]]]) -> None:
        self.chains = chains

    def ancestry(self, pid: int) -> Sequence[tuple[int, bytes]]:
        return self.chains.get(pid, ())


def ev(op: Op, path: str, comm: bytes, pid: int = 100, ppid: int = 1, new: str | None = None) -> FileEvent:
    return FileEvent(op, (P + path).encode(), (P + new).encode() if new else None, pid=pid, ppid=ppid, uid=0,
                     comm=comm, backend="bpf")


TREE = Procs({
    200: [(200, b"useradd"), (150, b"sh"), (120, b"dpkg"), (1, b"init")],  # a maintainer script's child
    300: [(300, b"vi"), (250, b"sudo"), (1, b"init")],
    150: [(150, b"sh"), (120, b"dpkg"), (1, b"init")],
    400: [(400, b"rm"), (390, b"logrotate"), (1, b"init")],
})

# name -> (the rule the case is about, event, whether it raises that rule; no other rule may fire)
PURE_CASES: dict[str, tuple[str, FileEvent, bool]] = {
    "passwd written by a shell": ("account-database", ev(Op.CLOSE_WRITE, "/etc/passwd", b"sh"), True),
    "shadow renamed into place by vipw": ("account-database",
                                          ev(Op.RENAME, "/etc/nshadow", b"vipw", new="/etc/shadow"), True),
    "passwd by useradd under dpkg": ("account-database", ev(Op.CLOSE_WRITE, "/etc/passwd", b"useradd", pid=200), False),
    "group by an exited child of dpkg's script": ("account-database",
                                                  ev(Op.CLOSE_WRITE, "/etc/group", b"cp", pid=999, ppid=150), False),
    "passwd opened for writing, not yet closed": ("account-database", ev(Op.OPEN_WRITE, "/etc/passwd", b"sh"), False),
    "passwd-: not the database": ("account-database", ev(Op.CLOSE_WRITE, "/etc/passwd-", b"sh"), False),
    "sudoers.d file by vi under sudo": ("sudoers", ev(Op.CLOSE_WRITE, "/etc/sudoers.d/90-evil", b"vi", pid=300), True),
    "sudoers chmod": ("sudoers", ev(Op.CHMOD, "/etc/sudoers", b"chmod"), True),
    "sudoers by dpkg": ("sudoers", ev(Op.RENAME, "/etc/sudoers.dpkg-new", b"dpkg", new="/etc/sudoers"), False),
    "sudo.conf: not sudoers": ("sudoers", ev(Op.CLOSE_WRITE, "/etc/sudo.conf", b"vi"), False),
    "root's authorized_keys appended": ("ssh-authorized-keys",
                                        ev(Op.CLOSE_WRITE, "/root/.ssh/authorized_keys", b"sh"), True),
    "a user's authorized_keys2": ("ssh-authorized-keys",
                                  ev(Op.CLOSE_WRITE, "/home/bob/.ssh/authorized_keys2", b"sh"), True),
    "known_hosts: not keys": ("ssh-authorized-keys", ev(Op.CLOSE_WRITE, "/home/bob/.ssh/known_hosts", b"ssh"), False),
    "cron.d job": ("cron", ev(Op.CLOSE_WRITE, "/etc/cron.d/job", b"sh"), True),
    "user crontab spool": ("cron", ev(Op.RENAME, "/var/spool/cron/crontabs/tmp.x", b"crontab",
                                      new="/var/spool/cron/crontabs/root"), True),
    "crontab.bak: not cron": ("cron", ev(Op.CLOSE_WRITE, "/etc/crontab.bak", b"sh"), False),
    "unit file": ("systemd-units", ev(Op.CLOSE_WRITE, "/etc/systemd/system/evil.service", b"sh"), True),
    "user unit enabled": ("systemd-units", ev(Op.SYMLINK, "/home/bob/.config/systemd/user/default.target.wants/x.service",
                                              b"ln"), True),
    "unit by systemctl under dpkg": ("systemd-units",
                                     ev(Op.SYMLINK, "/etc/systemd/system/multi-user.target.wants/a.service",
                                        b"systemctl", pid=999, ppid=150), False),
    "journald.conf: not a unit": ("systemd-units", ev(Op.CLOSE_WRITE, "/etc/systemd/journald.conf", b"vi"), False),
    "binary replaced by cp": ("system-binaries", ev(Op.CLOSE_WRITE, "/usr/bin/ls", b"cp"), True),
    "sbin binary deleted": ("system-binaries", ev(Op.UNLINK, "/sbin/sshd", b"rm"), True),
    "binary by dpkg": ("system-binaries", ev(Op.RENAME, "/usr/bin/ls.dpkg-new", b"dpkg", new="/usr/bin/ls"), False),
    "usr/local/bin: not system": ("system-binaries", ev(Op.CLOSE_WRITE, "/usr/local/bin/tool", b"cp"), False),
    "shell writes a web root": ("shell-writes-web-root", ev(Op.CLOSE_WRITE, "/var/www/html/x.php", b"bash"), True),
    "cp writes a web root": ("shell-writes-web-root", ev(Op.CLOSE_WRITE, "/var/www/html/index.html", b"cp"), False),
    "shell writes elsewhere": ("shell-writes-web-root", ev(Op.CLOSE_WRITE, "/var/tmp/x.php", b"bash"), False),
    "log deleted": ("log-deletion", ev(Op.UNLINK, "/var/log/auth.log", b"rm"), True),
    "log truncated": ("log-deletion", ev(Op.TRUNCATE, "/var/log/syslog", b"truncate"), True),
    "log deleted by logrotate's child": ("log-deletion", ev(Op.UNLINK, "/var/log/syslog.7.gz", b"rm", pid=400), False),
    "log written: not deleted": ("log-deletion", ev(Op.CLOSE_WRITE, "/var/log/syslog", b"rsyslogd"), False),
}


@pytest.mark.parametrize("name", list(PURE_CASES))
def test_rule(name: str) -> None:
    rule, event, raises = PURE_CASES[name]
    got = {a.rule.name for a in config_alerts(config(P), event, TREE)}
    assert got == ({rule} if raises else set())


def test_every_rule_has_a_case_that_raises_it_and_one_that_must_not() -> None:
    names = {r.name for rs in config(P).rulesets for r in rs.rules}
    assert {rule for rule, _, raises in PURE_CASES.values() if raises} == names
    assert {rule for rule, _, raises in PURE_CASES.values() if not raises} == names


def test_alerts_capture_what_they_watch() -> None:
    cfg = config(P)
    assert cfg.has_alerts and Op.CLOSE_WRITE in cfg.ops and Op.UNLINK in cfg.ops and Op.RENAME in cfg.ops


# -- live -----------------------------------------------------------------------------------------------------------


def wait_for(cond: Callable[[], bool], timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_alerts(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_bytes().splitlines()]


@pytest.mark.root
@pytest.mark.slow
def test_live_ruleset_on_bpf(tmp_path: Path) -> None:
    root = tmp_path / "root"
    p = str(root)
    for d in ("etc/sudoers.d", "etc/cron.d", "etc/systemd/system", "home/alice/.ssh", "usr/bin", "var/www/html",
              "var/log", "bin"):
        (root / d).mkdir(parents=True)
    for f in ("etc/passwd", "etc/shadow", "etc/group", "var/log/auth.log", "var/log/syslog.1", "var/log/syslog"):
        (root / f).write_text("old\n")
    fake = tmp_path / "fakebin"  # programs named like a package manager and logrotate (comm is the exec'd name)
    fake.mkdir()
    for name in ("dpkg", "logrotate"):
        (fake / name).symlink_to("/bin/dash")
    alerts_file = tmp_path / "alerts.jsonl"
    conf = tmp_path / "security.toml"
    conf.write_text(rooted(p, f'\n[[output]]\ntype = "file"\npath = "{alerts_file}"\nrecords = "alerts"\n'
                              'fsync = "none"\n'))
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115
    daemon = subprocess.Popen([*KWATCH, "run", "-c", str(conf), "--backend", "bpf", "--no-metrics", "--log-json"],
                              stdout=log, stderr=log)
    held: list[subprocess.Popen[bytes]] = []
    try:
        wait_for(lambda: b'"event":"ready"' in (tmp_path / "daemon.log").read_bytes() or daemon.poll() is not None,
                 what="the daemon ready")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()

        def sh(script: str, prog: str = "/bin/sh") -> None:
            subprocess.run([prog, "-c", script], check=True)

        sh(f"echo x >> {p}/etc/passwd")
        sh(f"echo x >> {p}/etc/shadow", str(fake / "dpkg"))
        # short-lived children of the "package manager" and of "logrotate", judged after they exited: their parent
        # is still there (it waits on its stdin until the end; ending the script with the command instead would
        # let the shell exec it, and the child would be the parent)
        held.append(subprocess.Popen([str(fake / "dpkg"), "-c", f"cp {p}/etc/passwd {p}/etc/group; read x"],
                                     stdin=subprocess.PIPE))
        wait_for(lambda: (root / "etc/group").read_bytes() == (root / "etc/passwd").read_bytes(), what="the cp")
        sh(f"echo x > {p}/etc/sudoers.d/evil")
        sh(f"echo x > {p}/etc/sudo.conf")
        sh(f"echo key >> {p}/home/alice/.ssh/authorized_keys")
        sh(f"echo host >> {p}/home/alice/.ssh/known_hosts")
        sh(f"echo job > {p}/etc/cron.d/evil")
        sh(f"echo x > {p}/etc/crontab.bak")
        sh(f"echo '[Service]' > {p}/etc/systemd/system/evil.service")
        sh(f"echo x > {p}/etc/systemd/journald.conf")
        subprocess.run(["cp", "/bin/true", f"{p}/usr/bin/evil"], check=True)
        sh(f"echo x > {p}/usr/bin/pkgtool", str(fake / "dpkg"))
        sh(f"echo '<?php' > {p}/var/www/html/shell.php")
        subprocess.run(["cp", "/etc/hostname", f"{p}/var/www/html/index.html"], check=True)
        subprocess.run(["rm", f"{p}/var/log/auth.log"], check=True)
        held.append(subprocess.Popen([str(fake / "logrotate"), "-c", f"rm {p}/var/log/syslog.1; read x"],
                                     stdin=subprocess.PIPE))
        wait_for(lambda: not (root / "var/log/syslog.1").exists(), what="the rm")
        sh(f"echo x >> {p}/var/log/syslog")
        sh(f"echo sentinel >> {p}/etc/gshadow")  # the last one: every earlier event was handled before it
        wait_for(lambda: daemon.poll() is not None
                 or any(a.get("path") == f"{p}/etc/gshadow" for a in read_alerts(alerts_file)),
                 what="the sentinel's alert")
        assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
        got = {(a["rule"], str(a["path"])[len(p):], a["comm"]) for a in read_alerts(alerts_file)
               if a["kind"] == "alert"}
        assert all(a["kind"] == "alert" and a["level"] in ("warning", "err") for a in read_alerts(alerts_file))
    finally:
        for h in held:
            h.communicate(b"\n", timeout=30)
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(90)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()
        log.close()
    want = {
        ("account-database", "/etc/passwd", "sh"),
        ("sudoers", "/etc/sudoers.d/evil", "sh"),
        ("ssh-authorized-keys", "/home/alice/.ssh/authorized_keys", "sh"),
        ("cron", "/etc/cron.d/evil", "sh"),
        ("systemd-units", "/etc/systemd/system/evil.service", "sh"),
        ("system-binaries", "/usr/bin/evil", "cp"),
        ("shell-writes-web-root", "/var/www/html/shell.php", "sh"),
        ("log-deletion", "/var/log/auth.log", "rm"),
        ("account-database", "/etc/gshadow", "sh"),
    }
    assert got == want
    shutil.rmtree(root)
