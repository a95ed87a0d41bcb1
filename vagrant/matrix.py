"""The kernel matrix: boot Debian's kernels under QEMU with this machine's root filesystem and run kwatch's tests there.

    python vagrant/matrix.py fetch [KERNEL...]      fetch and unpack the kernels of vagrant/kernels.txt (cached)
    python vagrant/matrix.py run KERNEL -- CMD...   boot KERNEL, run CMD as root inside, pass on its output and status
    python vagrant/matrix.py test [-j N] [--set full|ci] [KERNEL...]
                                                    the kernel-facing tests in each guest (N at a time); a summary;
                                                    status 1 if any failed

How a guest is made: virtme-ng (``vng``, from the venv) boots the kernel's own bzImage under QEMU with this machine's
root filesystem shared read-only over 9p (``--force-9p``: vng's virtiofsd attempt costs seconds for nothing here) and
throwaway overlays on /etc, /var, /tmp...; ``--disable-kvm`` because this machine's /dev/kvm (a software hypervisor)
aborts QEMU, so QEMU emulates the CPU (TCG): everything runs several times slower than on the host, so absolute times
mean nothing there and the tests' deadlines are scaled (KWATCH_TEST_TIME_SCALE, tests/support/timescale.py).

Inside, before the command: bpffs and tracefs mounted (vng does not mount bpffs), an ext4 filesystem on /tmp (a loop
file in RAM: the overlay vng puts there is refused by fanotify's filesystem marks, so fanotify would look absent, and
tmpfs before 6.6 refuses user.* xattrs, which the capture tests set), the kernel's own boot/ bound
over /boot (libbpf reads the running kernel's config from /boot/config-$(uname -r)). The guest can write only the
directory passed with ``--rwdir`` (OUT below, under build/kernel-matrix/): results come back through it.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNELS_FILE = REPO / "vagrant" / "kernels.txt"
#: the unpacked kernels; the guest reads the kernel's boot/ from here, so not under /var/cache (a tmpfs in the guest)
CACHE = Path(os.environ.get("KWATCH_KERNEL_CACHE", "/var/lib/kwatch-kernels"))
OUT = REPO / "build" / "kernel-matrix"
VENV_BIN = REPO / ".venv" / "bin"
#: TCG runs the guest 5-20x slower than the host; every condition wait of the tests is stretched by this much
TIME_SCALE = os.environ.get("KWATCH_TEST_TIME_SCALE", "10")
#: pytest-timeout's per-test deadline in the guest (pyproject's 600 s is sized for the host)
GUEST_TEST_TIMEOUT = 1500
#: the whole guest run; a hung guest must not eat CI's budget
GUEST_TIMEOUT = int(os.environ.get("KWATCH_GUEST_TIMEOUT", "2400"))
#: boot()'s status for a guest stopped at GUEST_TIMEOUT (timeout(1)'s)
GUEST_TIMED_OUT = 124

#: The kernel-facing tests: capture on every backend and both BPF programs (exact sequences, filters, exclusion,
#: losses; the VFS hooks' io_uring, symlinked-directory and thread-race cases), the barrier,
#: `kwatch trace`, `kwatch doctor`, and live replication to a local mirror with its loss recovery.
KERNEL_TESTS = [
    "tests/kernel/test_capture_bpf.py",
    "tests/kernel/test_capture_vfs.py",
    "tests/kernel/test_capture_fanotify.py",
    "tests/kernel/test_capture_inotify.py",
    "tests/unit/test_capture_filter.py",
    "tests/kernel/test_capture_barrier.py",
    "tests/kernel/test_trace.py",
    "tests/kernel/test_doctor.py",
    "tests/kernel/test_fexit_variants.py",
    "tests/e2e/test_replicate_loss.py",
    "tests/e2e/test_replicate.py::test_untar_into_a_fresh_tree_then_a_directory_rename_converges_on_every_backend",
]

#: What CI runs in each guest (``--set ci``, .ci/run): the programs the host cannot run, the VFS hooks with their
#: prototype variants, whose outcome depends on the kernel. Every guest also runs `kwatch doctor` once (its status
#: is checked); the doctor's own tests (11 min of a 23-min run of the 6.18 guest on a loaded machine) and the rest of
#: KERNEL_TESTS run the same userspace on the host in CI's `make check`.
KERNEL_TESTS_CI = [
    "tests/kernel/test_capture_vfs.py",
    "tests/kernel/test_fexit_variants.py",
    # the tracepoint program's two builds load on this kernel too (on 6.1 a change that passed on the host and in
    # the VFS tests broke them: the verifier's stack limit), shown by the pivot_root case; and each field of a
    # record matches /proc on the VFS hooks (the backend bpf picks there)
    "tests/kernel/test_capture_bpf.py::test_a_pivot_rooted_process_is_never_reported_under_a_wrong_host_path"
    "[auto-root-in-tree]",
    "tests/kernel/test_capture_bpf.py::test_a_pivot_rooted_process_is_never_reported_under_a_wrong_host_path"
    "[probe-read-root-in-tree]",
    "tests/kernel/test_context.py::test_each_field_of_a_real_record_matches_proc[bpf]",
]
SETS = {"full": KERNEL_TESTS, "ci": KERNEL_TESTS_CI}


@dataclass(frozen=True)
class Kernel:
    name: str
    package: str
    version: str
    #: the Debian suite to fetch it from when it is not one this machine's apt already has (e.g. a backports suite)
    suite: str | None = None

    @property
    def dir(self) -> Path:
        return CACHE / f"{self.package}_{self.version}"

    @property
    def boot(self) -> Path:
        return self.dir / "boot"

    def image(self) -> Path:
        found = sorted(self.boot.glob("vmlinuz-*"))
        if not found:
            raise SystemExit(f"{self.name}: no vmlinuz in {self.boot}")
        return found[0]


def kernels() -> list[Kernel]:
    out = []
    for line in KERNELS_FILE.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, package, version, *suite = line.split()
            out.append(Kernel(name, package, version, suite[0] if suite else None))
    return out


def pick(names: list[str]) -> list[Kernel]:
    known = {k.name: k for k in kernels()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown kernel(s) {', '.join(unknown)}: {KERNELS_FILE} lists {', '.join(known)}")
    return [known[n] for n in names] if names else list(known.values())


def fetch(k: Kernel) -> None:
    """Download the pinned package and unpack it into the cache (never installed); a no-op when it is there."""
    if k.boot.is_dir() and any(k.boot.glob("vmlinuz-*")):
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f".{k.package}.part"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    print(f"fetching {k.package}={k.version}", file=sys.stderr)
    apt = ["apt-get", *_suite_options(k.suite)] if k.suite else ["apt-get"]
    try:
        if k.suite:
            subprocess.run([*apt, "update", "-q"], check=True)
        # apt-get download as root warns that _apt cannot write the directory; harmless (the file is written)
        subprocess.run([*apt, "download", "-q", f"{k.package}={k.version}"], cwd=tmp, check=True)
    except subprocess.CalledProcessError as e:
        where = f"suite {k.suite} of this machine's Debian archive" if k.suite else "this machine's apt sources"
        raise SystemExit(
            f"kernel {k.name}: cannot fetch {k.package}={k.version} from {where} ({' '.join(e.cmd[:1] + e.cmd[-3:])}: "
            f"status {e.returncode}). If Debian dropped that version (security updates replace a kernel's package "
            f"name with the next ABI's), pin the current one in {KERNELS_FILE}.") from None
    (deb,) = tmp.glob("*.deb")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "root")], check=True)
    shutil.rmtree(k.dir, ignore_errors=True)
    (tmp / "root").rename(k.dir)
    shutil.rmtree(tmp)


def _archive_source() -> tuple[str, str | None]:
    """(URI, signed-by keyring) of the archive this machine's apt fetches its own release from (deb822 sources)."""
    release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    codename = release.get("VERSION_CODENAME", "").strip('"')
    for f in sorted(Path("/etc/apt/sources.list.d").glob("*.sources")):
        for stanza in f.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and line[:1] != "#")
            fields = {key.strip(): value.strip() for key, value in fields.items()}
            if codename and codename in fields.get("Suites", "").split() and fields.get("URIs"):
                return fields["URIs"].split()[0], fields.get("Signed-By")
    raise SystemExit(f"no apt source of this machine's release ({codename or 'unknown'}) in /etc/apt/sources.list.d")


def _suite_options(suite: str) -> list[str]:
    """apt-get options that see only ``suite`` of this machine's archive, with lists kept in the cache (the
    machine's own apt configuration is left alone)."""
    d = CACHE / "apt" / suite
    for sub in ("lists/partial", "cache/archives/partial"):
        (d / sub).mkdir(parents=True, exist_ok=True)
    uri, keyring = _archive_source()
    signed = f"[signed-by={keyring}] " if keyring else ""
    (d / "sources.list").write_text(f"deb {signed}{uri} {suite} main\n")
    return ["-o", f"Dir::Etc::SourceList={d / 'sources.list'}", "-o", "Dir::Etc::SourceParts=/dev/null",
            "-o", f"Dir::State::Lists={d / 'lists'}", "-o", f"Dir::Cache={d / 'cache'}"]


def _guest_prelude(k: Kernel) -> str:
    return "\n".join([
        "set -u",
        "mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf",
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing",
        # /tmp on ext4 (what servers run; tmpfs before 6.6 has no user.* xattrs), in a loop file in RAM
        "mkdir -p /run/kwimg && mount -t tmpfs -o size=1700m tmpfs /run/kwimg",
        "modprobe loop 2>/dev/null; truncate -s 1600M /run/kwimg/tmp.ext4 && mkfs.ext4 -q -F /run/kwimg/tmp.ext4",
        "mount -o loop /run/kwimg/tmp.ext4 /tmp && chmod 1777 /tmp",
        f"mount --bind {shlex.quote(str(k.boot))} /boot",
        f"cd {shlex.quote(str(REPO))}",
        f"export PATH={shlex.quote(str(VENV_BIN))}:$PATH KWATCH_TEST_TIME_SCALE={TIME_SCALE}",
        # the repository is read-only in the guest: no bytecode or pytest cache writes
        "export PYTHONDONTWRITEBYTECODE=1",
    ])


def boot(k: Kernel, script: str, out: Path, *, stdout: int | None = None, stderr: int | None = None) -> int:
    """Boot ``k``, run ``script`` (sh) as root inside with ``out`` writable; the exit status of the script."""
    fetch(k)
    out.mkdir(parents=True, exist_ok=True)
    guest = out / "guest.sh"
    guest.write_text(_guest_prelude(k) + "\n" + script + "\n")
    cpus = os.environ.get("KWATCH_GUEST_CPUS", "2")
    cmd = [
        str(VENV_BIN / "vng"), "--run", str(k.image()), "--force-9p", "--disable-kvm",
        "-m", os.environ.get("KWATCH_GUEST_MEM", "3G"), "-p", cpus, "--user", "root",
        f"--rwdir={out}", "--exec", f"sh {shlex.quote(str(guest))}",
    ]
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}")
    # QEMU's stdout and stderr stay apart: the guest's console goes to stderr, the command's output to stdout. vng
    # and the QEMU it starts get a process group of their own, so a guest past its time is stopped whole.
    if _STOPPING.is_set():
        return GUEST_TIMED_OUT
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
    _GUESTS.add(proc.pid)
    try:
        return proc.wait(timeout=GUEST_TIMEOUT)
    except subprocess.TimeoutExpired:
        print(f"{k.name}: the guest did not finish in {GUEST_TIMEOUT} s (KWATCH_GUEST_TIMEOUT): stopped",
              file=sys.stderr)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return GUEST_TIMED_OUT
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise


#: process groups of the guests running now (the SIGTERM handler kills them: guests run in worker threads)
_GUESTS: set[int] = set()
#: set on SIGTERM: no guest is started (or booted again) after it
_STOPPING = threading.Event()


def _on_sigterm(*_: object) -> None:
    _STOPPING.set()
    for pgid in list(_GUESTS):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    sys.exit(143)


def _summary(junit: Path) -> tuple[int, int, int, int, list[str]]:
    """(passed, failed, errors, skipped, failing node ids) from pytest's junit xml."""
    if not junit.exists():
        return 0, 0, 1, 0, ["(no junit report: pytest did not run to the end)"]
    root = ET.parse(junit).getroot()
    passed = failed = errors = skipped = 0
    bad = []
    for case in root.iter("testcase"):
        tags = {c.tag for c in case}
        nid = f"{case.get('classname')}::{case.get('name')}"
        if "failure" in tags:
            failed += 1
            bad.append(nid)
        elif "error" in tags:
            errors += 1
            bad.append(nid)
        elif "skipped" in tags:
            skipped += 1
            bad.append(nid + " (skipped)")
        else:
            passed += 1
    return passed, failed, errors, skipped, bad


def boot_again(ran: bool, rc: int) -> bool:
    """Whether a guest is booted once more: when it never ran its script (seen once: status 255 after 36 s, nothing
    on the console, on the first boot of a newly fetched kernel), a boot failure and not a test result; not after a
    timeout, which has used the guest's whole time already (a second one would double what CI waits), nor after a
    guest was killed (a negative status) or the run was told to stop (SIGTERM: the worker thread would otherwise
    start a guest that outlives the run)."""
    return not ran and rc != GUEST_TIMED_OUT and rc >= 0 and not _STOPPING.is_set()


def test_one(k: Kernel, pytest_args: list[str], tests: list[str]) -> tuple[bool, list[str]]:
    """The kernel-facing tests in one guest: (passed, summary lines)."""
    out = OUT / k.name
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    args = " ".join(shlex.quote(a) for a in pytest_args)
    names = " ".join(shlex.quote(t) for t in tests)
    script = "\n".join([
        "uname -r > $OUT/uname",
        "kwatch doctor --json > $OUT/doctor.json 2> $OUT/doctor.err; echo $? > $OUT/doctor.rc",
        f"python -m pytest -p no:cacheprovider -q --no-skips --timeout={GUEST_TEST_TIMEOUT} "
        f"--junitxml=$OUT/junit.xml {args} {names} > $OUT/pytest.log 2>&1",
        "echo $? > $OUT/pytest.rc",
    ]).replace("$OUT", shlex.quote(str(out)))
    t0 = time.monotonic()
    for attempt in (1, 2):
        with open(out / "console.log", "wb") as console, open(out / "stdout.log", "wb") as so:
            rc = boot(k, script, out, stdout=so.fileno(), stderr=console.fileno())
        if attempt == 2 or not boot_again((out / "uname").exists(), rc):
            break
        print(f"{k.name}: the guest did not start (status {rc}); booting it again", file=sys.stderr)
    took = time.monotonic() - t0
    prc = (out / "pytest.rc").read_text().strip() if (out / "pytest.rc").exists() else "none"
    drc = (out / "doctor.rc").read_text().strip() if (out / "doctor.rc").exists() else "none"
    passed, failed, errors, skipped, bad = _summary(out / "junit.xml")
    ok = rc == 0 and prc == "0" and drc == "0" and not failed and not errors
    uname = (out / "uname").read_text().strip() if (out / "uname").exists() else "?"
    guest = f"stopped at {GUEST_TIMEOUT} s" if rc == GUEST_TIMED_OUT else f"guest status {rc}"
    rows = [f"{k.name:6} {uname:28} {'ok' if ok else 'FAILED':7} passed {passed}, failed {failed}, "
            f"errors {errors}, skipped {skipped}; {took:.0f} s (pytest status {prc}, doctor status {drc}, "
            f"{guest})"]
    rows += [f"    {b}" for b in bad]
    print(rows[0], file=sys.stderr)
    if not ok:
        log = out / "pytest.log"
        if log.exists():
            sys.stderr.write("".join(log.read_text(errors="replace").splitlines(True)[-60:]))
    return ok, rows


def test(names: list[str], pytest_args: list[str], jobs: int = 1, tests: str = "full") -> int:
    """Every kernel (or those named), ``jobs`` guests at a time, the test set ``tests`` (:data:`SETS`); status 1 if
    any failed."""
    ks = pick(names)
    for k in ks:
        fetch(k)  # before any guest starts: apt-get runs one at a time
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        results = list(pool.map(lambda k: test_one(k, pytest_args, SETS[tests]), ks))
    print(f"\nkernel matrix, {tests} set (" + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()) + "):")
    for _, rows in results:
        print("\n".join(rows))
    print(f"reports: {OUT}/<kernel>/ (pytest.log, junit.xml, doctor.json, console.log)")
    return 0 if all(ok for ok, _ in results) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch")
    f.add_argument("kernels", nargs="*")
    r = sub.add_parser("run")
    r.add_argument("kernel")
    r.add_argument("command", nargs=argparse.REMAINDER)
    t = sub.add_parser("test")
    t.add_argument("kernels", nargs="*")
    t.add_argument("--pytest-args", default="", help="extra pytest arguments, one string")
    t.add_argument("-j", "--jobs", type=int, default=int(os.environ.get("KWATCH_GUEST_JOBS", "1")),
                   help="guests at a time (each emulates 2 CPUs: more than cores/2 only slows each down)")
    t.add_argument("--set", dest="tests", choices=sorted(SETS), default="full",
                   help="full: every kernel-facing test; ci: those whose outcome depends on the kernel")
    a = ap.parse_args(argv)
    # a SIGTERM (make interrupted, CI's timeout) unwinds like an exception, so the guest's process group goes too
    signal.signal(signal.SIGTERM, _on_sigterm)
    if os.geteuid() != 0:
        print("the kernel matrix needs root (BPF and fanotify in the guest run as root too)", file=sys.stderr)
        return 1
    if a.cmd == "fetch":
        for k in pick(a.kernels):
            fetch(k)
        return 0
    if a.cmd == "run":
        (k,) = pick([a.kernel])
        command = a.command[1:] if a.command[:1] == ["--"] else a.command
        out = OUT / k.name / "run"
        return boot(k, " ".join(shlex.quote(c) for c in command), out)
    return test(a.kernels, shlex.split(a.pytest_args), a.jobs, a.tests)


if __name__ == "__main__":
    sys.exit(main())
