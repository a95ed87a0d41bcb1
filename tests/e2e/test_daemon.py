"""The daemon for real: ``kwatch run`` as a subprocess on the BPF backend, driven by real file operations, observed
through what its actions record, its structured log, and its Prometheus endpoint (scraped over HTTP and parsed).

Also the pure part: which capture roots a config's rules give.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from ports import free_port
from prometheus_client.parser import text_string_to_metric_families
from timescale import scaled

from kwatch.daemon.roots import capture_roots, wanted_roots
from kwatch.rules import parse_config
from kwatch.rules.prefix import literal_prefix, rule_root

KWATCH = [sys.executable, "-c", "import sys; from kwatch.cli import main; sys.exit(main())"]
CONVERT = "/usr/bin/convert"
START_TIMEOUT = 60.0  # loading and attaching the BPF object; slow when the machine is busy
STOP_TIMEOUT = 90.0  # detaching 80 programs waits for RCU grace periods: seconds


# -- pure: capture roots from rule regexes -------------------------------------------------------------------------

ROOT_CASES: dict[str, tuple[str, bytes | None]] = {
    "hot folder (brief)": (r"^/export/home/image-converter.*\.jpg$", b"/export/home"),
    "prefix that is a name start": ("^/home/mike/test", b"/home/mike"),
    "component end group": ("^/tmp/kwatch-demo(/|$)", b"/tmp/kwatch-demo"),
    "non-capturing component end": ("^/srv/x(?:/|$)", b"/srv/x"),
    "exact path": ("^/etc/passwd$", b"/etc/passwd"),
    "prefix then more regex": ("^/tmp/kwatch-demo(/a|/b)", b"/tmp"),
    "trailing slash": ("^/srv/in/", b"/srv/in"),
    "escaped dot": (r"^/a\.b/c", b"/a.b"),
    "escaped dash (re.escape)": (r"^/tmp/pytest\-of\-root/x/", b"/tmp/pytest-of-root/x"),
    "optional char": ("^/dat?a/x", b"/"),
    "counted char": ("^/ab{2}/", b"/"),
    "one or more": ("^/x+/y", b"/"),
    r"\A anchor": (r"\A/q/r", b"/q"),
    "group after prefix": ("^/a/(b|c)/x", b"/a"),
    "class after prefix": ("^/tmp/[a-z]/", b"/tmp"),
    "unanchored": (r"\.jpg$", None),
    "top-level alternation": ("^/a/|/b/", None),
    "class first": ("^[/]x", None),
    "relative literal": ("^x/", None),
    "character class escape": (r"^/\d+/", b"/"),
    "alternation inside a class is literal": ("^/a/[|]/", b"/a"),
}


@pytest.mark.parametrize("case", list(ROOT_CASES))
def test_rule_root(case: str) -> None:
    pattern, root = ROOT_CASES[case]
    assert rule_root(pattern) == root


def test_literal_prefix_rest() -> None:
    assert literal_prefix(r"^/export/home/image-converter.*\.jpg$") == (
        "/export/home/image-converter",
        r".*\.jpg$",
    )


def test_wanted_and_capture_roots() -> None:
    text = "RULE ^/a/b/c/\nANY true\nRULE ^/a/b/\nANY true\nRULE ^/z/\n"  # the last rule has no action
    cfg, _ = parse_config(text, "r.conf", toml=False)
    assert cfg is not None
    assert wanted_roots(cfg) == (b"/a/b", b"/a/b/c")
    existing = {b"/a"}
    assert capture_roots(wanted_roots(cfg) or (), lambda p: p in existing) == (b"/a",)
    assert capture_roots([b"/nope/x"], lambda p: False) == ()  # only "/" exists: the whole system
    cfg2, _ = parse_config("RULE ^/a/\nANY true\nRULE jpg$\nANY true\n", "r.conf", toml=False)
    assert cfg2 is not None and wanted_roots(cfg2) is None


# -- the daemon as a process ---------------------------------------------------------------------------------------


def wait_until(pred: Callable[[], object], timeout: float, what: str, step: float = 0.05) -> None:
    """Wait for a condition; ``timeout`` only bounds a wait that would otherwise never end (a loaded 2-core machine
    or an emulated guest takes far longer than an idle one): nothing here asserts how fast the daemon is."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(step)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class DaemonProc:
    def __init__(self, tmp: Path, config: Path | None, *extra: str) -> None:
        self.port = free_port()
        self.out_path = tmp / f"daemon-{self.port}.out"
        self.err_path = tmp / f"daemon-{self.port}.err"
        self.status_socket = tmp / f"status-{self.port}.sock"
        args = [*KWATCH, "run", "--backend", "bpf", "--metrics", f"127.0.0.1:{self.port}",
                "--status-socket", str(self.status_socket), *extra]
        if config is not None:
            args += ["-c", str(config)]
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen(args, stdout=out, stderr=err, cwd=tmp)
        self.wait_log('"event":"ready"' if "--log-json" in extra else "event=ready", START_TIMEOUT)

    @property
    def err(self) -> str:
        return self.err_path.read_text(errors="replace")

    @property
    def out(self) -> bytes:
        return self.out_path.read_bytes()

    def wait_log(self, needle: str, timeout: float = 90.0, count: int = 1) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and self.err.count(needle) < count:
                raise AssertionError(f"daemon exited ({self.proc.returncode}) before {needle!r}:\n{self.err}")
            return self.err.count(needle) >= count

        wait_until(seen, timeout, f"{needle!r} in the daemon log")

    def settle(self, poke: Callable[[], object], seen: Callable[[], object], timeout: float = 60.0) -> None:
        """Wait until every event made before now is handled, instead of waiting for time to pass.

        ``poke`` makes one event that a rule turns into a visible action (``seen``). The daemon reads events in the
        order they were made, so once the marker's action is seen every earlier event was read, and once no action
        runs or waits every action those events asked for has ended: a late duplicate or a loop would show now.
        """
        poke()
        wait_until(seen, timeout, "the marker's action")
        wait_until(lambda: self.metric("kwatch_queue_depth", queue="actions_running") == 0
                   and self.metric("kwatch_queue_depth", queue="actions_waiting") == 0, timeout,
                   "no action running or waiting")

    def scrape(self) -> Samples:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as r:
            text = r.read().decode()
        out: Samples = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, frozenset(s.labels.items()))] = s.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        return self.scrape().get((name, frozenset(labels.items())), 0.0)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(STOP_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., DaemonProc]]:
    procs: list[DaemonProc] = []

    def _start(config: Path | None, *extra: str) -> DaemonProc:
        d = DaemonProc(tmp_path, config, *extra)
        procs.append(d)
        return d

    yield _start
    for d in procs:
        d.kill()


def records(path: Path) -> list[bytes]:
    """NUL-terminated entries written by a recording action."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return data.split(b"\0")[:-1]


def write(path: Path, data: bytes = b"x\n") -> None:
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def made_dirs() -> Iterator[Callable[[str], Path]]:
    """Unique directories at fixed places the verbatim regexes need (/export/home/..., /home/mike/...), removed after.

    Only the unique leaf is removed whole; the shared ancestors this made (/export/home) are removed only if empty,
    so a run of the suite at the same time (another checkout) keeps the ones its own directories are in.
    """
    created: list[tuple[Path, Path]] = []

    def make(path: str) -> Path:
        p = Path(path)
        top = p
        while not top.parent.exists():
            top = top.parent
        created.append((p, top))
        p.mkdir(parents=True)
        return p

    yield make
    for leaf, top in reversed(created):
        shutil.rmtree(leaf, ignore_errors=True)
        d = leaf.parent
        while d != top.parent and d != d.parent:
            try:
                d.rmdir()
            except OSError:  # not empty (another run uses it) or gone
                break
            d = d.parent


# The brief's two example rules, verbatim, except that UNLINK records its argument here instead of ssh-ing.
EXAMPLE = r"""RULE ^/export/home/image-converter.*\.jpg$
OPENW  /usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png
RULE ^/home/mike/test
IGNORE \.Xauthority
UNLINK  printf '%s\0' _FILE_ >> {record}
RENAME  ... _OLD_FILE_ ... _NEW_FILE_
"""

HOSTILE = 'my "holiday" pic\'s 1 $(touch canary) `touch canary2`.jpg'
# (a newline would not match the verbatim ".*"; ImageMagick itself globs "*?[" in file names)
HOSTILE2 = "-rf ;rm x `id` $HOME \\ ü\udcff.jpg"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.root
@pytest.mark.skipif(not os.path.exists(CONVERT), reason="needs ImageMagick's convert")
def test_example_rules_hot_folder_and_unlink(
    tmp_path: Path, start: Callable[..., DaemonProc], made_dirs: Callable[[str], Path]
) -> None:
    tag = f"kwtest-{os.getpid()}"
    hot = made_dirs(f"/export/home/image-converter-{tag}")
    mike = made_dirs(f"/home/mike/test-{tag}")
    record = tmp_path / "unlinked"
    cfg = tmp_path / "kwatch.conf"
    cfg.write_text(EXAMPLE.replace("{record}", str(record)))
    src = tmp_path / "src.jpg"
    subprocess.run([CONVERT, "-size", "16x16", "xc:blue", str(src)], check=True, timeout=60)

    d = start(cfg)
    assert "event=start backend=bpf" in d.err
    assert re.search(r"roots=/export/home,/home/mike\b", d.err), d.err
    before = d.scrape()

    # one jpg copied in (written, then closed), one written under a temporary name and renamed into place
    shutil.copyfile(src, hot / HOSTILE)
    part = hot / (HOSTILE2 + ".part")
    shutil.copyfile(src, part)
    os.rename(part, hot / HOSTILE2)
    pngs = [hot / (HOSTILE[: -len(".jpg")] + ".png"), hot / (HOSTILE2[: -len(".jpg")] + ".png")]
    wait_until(lambda: all(p.exists() for p in pngs), 90, "both pngs")
    wait_until(lambda: d.metric("kwatch_actions_total", rule="kwatch.conf:1", result="ok") == 2, 90, "2 ok")

    # the second rule: UNLINK fires with the exact path; .Xauthority is ignored
    (mike / "sub").mkdir()
    victims = [mike / "gone one", mike / "sub" / "it's $(x)\n`y`"]
    for p in [*victims, mike / ".Xauthority", mike / "sub" / ".Xauthority"]:
        write(p)
    for p in [*victims, mike / ".Xauthority", mike / "sub" / ".Xauthority"]:
        p.unlink()
    wait_until(lambda: len(records(record)) >= 2, 90, "two unlinks recorded")

    marker = mike / "marker"
    d.settle(lambda: (write(marker), marker.unlink()), lambda: os.fsencode(marker) in records(record))
    assert sorted(records(record)) == sorted(os.fsencode(p) for p in [*victims, marker])
    names = sorted(p.name for p in hot.iterdir())
    assert names == sorted([HOSTILE, HOSTILE2, pngs[0].name, pngs[1].name])  # no canary, no stray file
    for p in pngs:
        assert p.read_bytes()[:8] == PNG_MAGIC
    assert not Path("canary").exists() and not (tmp_path / "canary").exists()

    after = d.scrape()
    m = dict(after)

    def val(name: str, **labels: str) -> float:
        return m.get((name, frozenset(labels.items())), 0.0)

    # convert ran exactly once per jpg: no loop, no duplicate
    assert val("kwatch_actions_total", rule="kwatch.conf:1", result="started") == 2
    assert val("kwatch_actions_total", rule="kwatch.conf:1", result="ok") == 2
    assert val("kwatch_rule_matches_total", rule="kwatch.conf:1") == 2
    assert val("kwatch_actions_total", rule="kwatch.conf:3", result="ok") == 3  # the two victims and the marker
    assert val("kwatch_rule_matches_total", rule="kwatch.conf:3") == 3
    cw = ("kwatch_events_total", frozenset({("op", "close_write"), ("backend", "bpf")}))
    assert after[cw] > before.get(cw, 0.0)
    assert val("kwatch_events_total", op="unlink", backend="bpf") >= 5
    assert val("kwatch_action_latency_seconds_count") == 5
    assert val("kwatch_action_latency_seconds_bucket", le="+Inf") == 5
    assert 0 < val("kwatch_action_latency_seconds_sum") < 20
    assert val("kwatch_events_lost_total", backend="bpf") == 0
    assert ("kwatch_queue_depth", frozenset({("queue", "actions_waiting")})) in after
    assert val("kwatch_queue_depth", queue="actions_running") == 0
    assert d.stop() == 0
    assert "event=stopped" in d.err


LOOP_TOML = """
[[rule]]
name = "append"
match = '^{dir}/loop/.*\\.txt$'
on = ["CLOSEW"]
run = "echo x >> _FILE_"

[[rule]]
name = "retrigger"
match = '^{dir}/again/.*\\.txt$'
on = ["CLOSEW"]
retrigger = true
run = "if [ $(wc -l < _FILE_) -lt 3 ]; then echo x >> _FILE_; fi"

[[rule]]
name = "later"
match = '^{dir}/later/sub/'
on = ["CLOSEW"]
run = "echo x >> _FILE_"
"""


@pytest.mark.root
def test_actions_do_not_retrigger_unless_asked(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    """``echo x >> _FILE_`` on CLOSEW would loop forever if the action's own write triggered the rule again."""
    base = tmp_path / "w"
    (base / "loop").mkdir(parents=True)
    (base / "again").mkdir()
    cfg = tmp_path / "loop.toml"
    cfg.write_text(LOOP_TOML.replace("{dir}", re.escape(str(base))))
    d = start(cfg)
    write(base / "loop" / "a.txt")
    write(base / "again" / "b.txt")
    wait_until(lambda: (base / "loop" / "a.txt").read_bytes() == b"x\nx\n", 90, "one append")
    wait_until(lambda: (base / "again" / "b.txt").read_bytes() == b"x\nx\nx\n", 90, "retriggered appends")
    marker = base / "loop" / "marker.txt"  # made after the appends' own writes: read after them
    d.settle(lambda: write(marker), lambda: marker.read_bytes() == b"x\nx\n")
    assert (base / "loop" / "a.txt").read_bytes() == b"x\nx\n"
    assert d.metric("kwatch_actions_total", rule="append", result="started") == 2  # a.txt and the marker
    assert d.metric("kwatch_actions_total", rule="retrigger", result="started") >= 2
    assert (base / "again" / "b.txt").read_bytes() == b"x\nx\nx\n"

    # later/sub did not exist at start: its nearest existing ancestor was watched; once it exists, the watch narrows
    assert re.search(r"event=start .*roots=\S*/w ops=", d.err), d.err
    (base / "later" / "sub").mkdir(parents=True)
    d.wait_log('event=filter why="a watched directory appeared"')
    assert re.search(r"event=filter .*roots=\S*/w/again,\S*/w/later/sub,\S*/w/loop ", d.err), d.err
    write(base / "later" / "sub" / "c")
    wait_until(
        lambda: (base / "later" / "sub" / "c").read_bytes() == b"x\nx\n", 90, "the action under later/"
    )
    assert d.stop() == 0


TAR_TOML = """
[[rule]]
name = "batch"
match = '^{dir}/'
on = ["CLOSEW"]
batch = "args"
batch_window = 0.5
batch_max = 1000
run = "printf '%s\\\\0' _FILES_ >> {record}; echo run >> {runs}"
"""


@pytest.mark.root
def test_tar_extraction_under_a_batch_rule(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    n = 3000
    src = tmp_path / "src"
    names: list[str] = []
    for i in range(n):
        sub = f"d{i % 30:02d} space"
        name = f"{sub}/f{i:04d}" + (" $(x)'q'" if i % 7 == 0 else "") + (".dat" if i % 2 else "")
        names.append(name)
    for name in names:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        write(src / name, name.encode())
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as t:
        t.add(src, arcname=".")
    dest = tmp_path / "dest"
    dest.mkdir()
    record, runs = tmp_path / "record", tmp_path / "runs"
    cfg = tmp_path / "tar.toml"
    cfg.write_text(
        TAR_TOML.replace("{dir}", re.escape(str(dest)))
        .replace("{record}", str(record))
        .replace("{runs}", str(runs))
    )
    d = start(cfg)
    subprocess.run(["tar", "xf", str(archive), "-C", str(dest)], check=True, timeout=120)
    expected = {os.fsencode(dest / name) for name in names}
    wait_until(lambda: set(records(record)) >= expected, 60, "every extracted file recorded")
    marker = dest / "marker"  # a late duplicate batch of the tar's events would run before the marker's ends
    d.settle(lambda: write(marker), lambda: os.fsencode(marker) in records(record))
    got = Counter(records(record))
    assert set(got) == expected | {os.fsencode(marker)}
    assert max(got.values()) == 1, [p for p, c in got.items() if c > 1][:5]
    nruns = len(runs.read_text().split())
    # batch_max 1000 -> at least 3; a window of 0.5 s bounds the rest; the marker may add one
    assert 3 <= nruns <= 13, nruns
    assert d.metric("kwatch_actions_total", rule="batch", result="ok") == nruns
    assert d.metric("kwatch_actions_total", rule="batch", result="started") == nruns
    assert d.metric("kwatch_rule_matches_total", rule="batch") >= n
    assert d.stop() == 0


@pytest.mark.root
def test_sighup_reload(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    record = tmp_path / "record"
    cfg = tmp_path / "reload.conf"

    def rule(d: Path, tag: str) -> str:
        return f"RULE ^{re.escape(str(d))}/\nCLOSEW printf '{tag} %s\\0' _FILE_ >> {record}\n"

    cfg.write_text(rule(one, "v1"))
    d = start(cfg)
    assert re.search(r"roots=\S*/one\b", d.err)
    write(one / "a1")
    write(two / "a1")
    wait_until(lambda: records(record), 90, "v1 record")

    # v2 watches only two/: the capture filter moves, the command changes. A writer keeps going meanwhile:
    # every one of its files must be handled exactly once, by v1 or v2.
    cfg.write_text(rule(one, "v2") + rule(two, "v2"))
    stop = threading.Event()
    written: list[Path] = []

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 2000:
            p = one / f"during{i}"
            write(p)
            written.append(p)
            i += 1
            time.sleep(0.002)

    t = threading.Thread(target=writer)
    t.start()
    try:
        wait_until(lambda: len(written) >= 50, 90, "writes before the reload")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_log("event=reload ")
        after_reload = len(written)
        wait_until(lambda: len(written) >= min(after_reload + 50, 2000), 90, "writes after the reload")
    finally:
        stop.set()
        t.join(10)
    write(two / "a2")
    wait_until(lambda: f"v2 {two / 'a2'}".encode() in records(record), 90, "v2 record for two/a2")
    wait_until(lambda: len(records(record)) >= 2 + len(written), 90, "every file written during the reload")
    recs = records(record)
    assert recs[0] == f"v1 {one / 'a1'}".encode()
    handled = Counter(r.split(b" ", 1)[1] for r in recs)
    for p in written:
        assert handled[os.fsencode(p)] == 1, p
    assert any(r.startswith(b"v1 " + os.fsencode(one / "during")) for r in recs)
    assert any(r.startswith(b"v2 " + os.fsencode(one / "during")) for r in recs)
    assert os.fsencode(two / "a1") not in handled  # written while v1 watched only one/
    assert 'event=filter why="config reloaded"' in d.err

    # a broken config: every error logged with file:line, the old config stays, the daemon keeps running
    cfg.write_text(rule(two, "v3") + "FROB something\nRULE ^/x/(\n")
    d.proc.send_signal(signal.SIGHUP)
    d.wait_log("event=reload_failed")
    assert f'where={cfg}:3 severity=error reason="unknown keyword' in d.err
    assert f"where={cfg}:4 severity=error" in d.err
    write(two / "a3")
    wait_until(lambda: f"v2 {two / 'a3'}".encode() in records(record), 90, "old config still active")
    assert d.proc.poll() is None
    assert d.metric("kwatch_config_reloads") == 1
    assert d.metric("kwatch_config_reload_errors") == 1
    assert d.stop() == 0


DRAIN_TOML = """
[[rule]]
name = "slow"
match = '^{dir}/slow/'
on = ["CLOSEW"]
run = "sleep 1; printf '%s\\\\0' _FILE_ >> {record}"

[[rule]]
name = "batch"
match = '^{dir}/batch/'
on = ["CLOSEW"]
batch = "stdin"
batch_window = 60
run = "tr '\\\\0' '\\\\n' | sed 's/^/batch /' | tr '\\\\n' '\\\\0' >> {record}"

[[rule]]
name = "hang"
match = '^{dir}/hang/'
on = ["CLOSEW"]
run = "sleep 120"
"""


@pytest.mark.root
def test_sigterm_drains_then_exits_zero(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    base = tmp_path / "w"
    for sub in ("slow", "batch", "hang"):
        (base / sub).mkdir(parents=True)
    record = tmp_path / "record"
    cfg = tmp_path / "drain.toml"
    cfg.write_text(DRAIN_TOML.replace("{dir}", re.escape(str(base))).replace("{record}", str(record)))
    d = start(cfg, "--grace", "4")
    write(base / "batch" / "b1")
    write(base / "slow" / "s1")
    write(base / "hang" / "h1")
    d.wait_log("event=action_start rule=slow")
    d.wait_log("event=action_start rule=hang")
    assert not records(record)  # the batch waits for its 60 s window, the slow action sleeps
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(STOP_TIMEOUT) == 0
    took = time.monotonic() - t0
    # the running slow action finished, the waiting batch was run, the hanging one was killed after the grace
    assert sorted(records(record)) == sorted(
        [os.fsencode(base / "slow" / "s1"), b"batch " + os.fsencode(base / "batch" / "b1")]
    )
    assert "event=action_killed rule=hang" in d.err
    assert "event=stopped killed=1" in d.err
    assert took >= 3.5
    hang_pid = int(re.search(r"event=action_start rule=hang action=CLOSEW pid=(\d+)", d.err).group(1))  # type: ignore[union-attr]
    assert not Path(f"/proc/{hang_pid}").exists()


@pytest.mark.root
@pytest.mark.skipif(not os.path.exists(CONVERT), reason="needs ImageMagick's convert")
def test_dry_run_prints_and_runs_nothing(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    hot = tmp_path / "hot"
    hot.mkdir()
    cfg = tmp_path / "dry.conf"
    cfg.write_text(
        f"RULE ^{re.escape(str(hot))}/.*\\.jpg$\n"
        "OPENW  /usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png\n"
    )
    d = start(cfg, "--dry-run", "--log-json")
    jpg = hot / "a b's.jpg"
    made = tmp_path / "made.jpg"
    subprocess.run([CONVERT, "-size", "8x8", "xc:red", str(made)], check=True, timeout=60)
    os.rename(made, jpg)  # one event: a finished file published under its final name
    wait_until(lambda: b"dry-run:" in d.out, 90, "a dry-run line")
    marker, made2 = hot / "marker.jpg", tmp_path / "made2.jpg"
    made2.write_bytes(jpg.read_bytes())
    # a convert started for the first file by mistake would have ended (and written its png) once this settles
    d.settle(lambda: os.rename(made2, marker), lambda: d.out.count(b"dry-run:") >= 2)
    assert sorted(p.name for p in hot.iterdir()) == sorted([jpg.name, marker.name])  # nothing ran
    out = d.out
    assert out.count(b"dry-run:") == 2
    assert b"command=/usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png" in out
    assert b"KWATCH_FILE='" + os.fsencode(jpg).replace(b"'", b"'\\''") + b"'" in out
    assert d.metric("kwatch_actions_total", rule="dry.conf:1", result="dry_run") == 2
    assert d.metric("kwatch_actions_total", rule="dry.conf:1", result="started") == 0
    # --log-json: every line is one JSON object with ts/level/event
    lines = [json.loads(line) for line in d.err.splitlines() if line.strip()]
    events = [x["event"] for x in lines]
    assert events[:2] == ["metrics", "start"] and "ready" in events and "action_done" in events
    done = next(x for x in lines if x["event"] == "action_done")
    assert done["result"] == "dry_run" and done["file"] == str(jpg)
    assert d.stop() == 0


@pytest.mark.root
def test_default_config_demo(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    """What ``make run`` shows a newcomer: the demo directory exists, a hint says what to type, changes print."""
    d = start(None)
    assert os.path.isdir("/tmp/kwatch-demo")
    assert "event=hint" in d.err and "/tmp/kwatch-demo" in d.err
    name = f"/tmp/kwatch-demo/test-{os.getpid()}"
    try:
        write(Path(name))
        os.rename(name, name + ".moved")
        wait_until(lambda: f"renamed {name} -> {name}.moved".encode() in d.out, 90, "the demo output")
        assert f"kwatch demo: close_write {name}\n".encode() in d.out
    finally:
        for p in (name, name + ".moved"):
            if os.path.exists(p):
                os.unlink(p)
    assert d.stop(signal.SIGINT) == 0


def test_replicate_rule_keeps_a_mirror(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    """A changedfiles REPLICATE line: the daemon keeps a local mirror identical through creates, edits, a directory
    rename and deletes, alongside an ordinary action, and exports the target's metrics."""
    from treecmp import tree_differences

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    (src / "old").write_bytes(b"before the daemon")
    log = tmp_path / "closed.log"
    conf = tmp_path / "r.conf"
    conf.write_text(
        f"RULE ^{src}(/|$)\n"
        f"REPLICATE {dst} settle=0.05\n"
        f"CLOSEW printf '%s\\n' _FILE_ >> {log}\n"
    )
    d = start(conf)

    def same() -> bool:
        try:
            return not tree_differences(src, dst, hardlinks=False)
        except FileNotFoundError:  # a temporary of the agent came and went while we listed the mirror
            return False

    wait_until(same, 90, "the initial sync")
    (src / "dir" / "sub").mkdir(parents=True)
    for i in range(200):
        (src / "dir" / "sub" / f"f{i}").write_bytes(b"%d" % i * 100)
    (src / "big").write_bytes(os.urandom(1 << 20))
    wait_until(same, 90, "the burst to reach the mirror")
    os.rename(src / "dir", src / "moved")
    with open(src / "big", "r+b") as f:
        f.seek(4096 * 100)
        f.write(b"edit" * 1024)
    os.unlink(src / "old")
    wait_until(same, 90, "rename, edit and delete to reach the mirror")
    target = str(dst)
    assert d.metric("kwatch_replication_renames_total", target=target) >= 1
    assert d.metric("kwatch_replication_deletes_total", target=target) >= 1
    literal = d.metric("kwatch_replication_bytes_total", target=target, kind="literal")
    matched = d.metric("kwatch_replication_bytes_total", target=target, kind="matched")
    assert matched >= (1 << 20) - 8192  # the edit of big went as a delta
    assert literal < 200 * 300 + (1 << 20) + 17 + 64 * 1024  # files once, the edit small; nothing re-sent
    assert d.metric("kwatch_replication_connected", target=target) == 1
    # nothing failed, so nothing waits for a retry (the series exist from the start: alerts need no absent())
    assert d.metric("kwatch_replication_retries_total", target=target) == 0
    assert d.metric("kwatch_replication_failed_paths", target=target) == 0
    barrier = {name.removeprefix("kwatch_capture_barrier_"): v for (name, _), v in d.scrape().items()
               if name.startswith("kwatch_capture_barrier_")}
    assert barrier.keys() == {"calls_total", "waits_total", "timeouts_total", "wait_seconds_total"}
    assert barrier["calls_total"] >= 1, "every frame of files checked the capture barrier first"
    assert barrier["waits_total"] <= barrier["calls_total"] and barrier["timeouts_total"] == 0
    assert (barrier["wait_seconds_total"] > 0) == (barrier["waits_total"] > 0)
    assert (src / "dir" / "sub" / "f7").as_posix().encode() + b"\n" in log.read_bytes()  # the action ran too
    assert d.stop() == 0


STATUS_TOML = """
[[rule]]
name = "secrets"
match = '^{src}/secret'
on = ["CLOSEW"]
alert = "a secret changed"

[[output]]
type = "file"
path = "{tmp}/audit.jsonl"
records = "alerts"

[[replicate]]
source = "{src}"
target = "{dst}"
"""


def kwatch_status(sock: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KWATCH, "status", "--socket", str(sock), *extra], capture_output=True, text=True,
                          timeout=60)


@pytest.mark.root
def test_status_reads_the_running_daemon(tmp_path: Path, start: Callable[..., DaemonProc]) -> None:
    """``kwatch status`` shows what the daemon is doing: the capture backend, events by op, rules hit and alerts,
    the output and its backlog, the replication target and its counters; exit 3 when no daemon answers."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    conf = tmp_path / "k.toml"
    conf.write_text(STATUS_TOML.format(src=src, dst=dst, tmp=tmp_path))
    d = start(conf)
    d.wait_log("event=status")
    assert (os.stat(d.status_socket).st_mode & 0o777) == 0o600, "the status names paths: root's only"
    for i in range(20):
        (src / f"f{i}").write_bytes(b"x")
    (src / "secret").write_bytes(b"s")

    def status() -> dict[str, Any]:
        r = kwatch_status(d.status_socket, "--json")
        assert r.returncode == 0, r.stderr
        return cast(dict[str, Any], json.loads(r.stdout))

    wait_until(lambda: status()["targets"][0]["files"] >= 21 and status()["outputs"][0]["records"] >= 1, 60,
               "the files replicated and the alert written")
    st = status()
    assert st["pid"] == d.proc.pid and st["backend"] == "bpf" and st["config"] == str(conf)
    assert st["blind_spots"] and all(isinstance(b, str) for b in st["blind_spots"])
    assert st["events"]["close_write"] >= 21 and st["events_total"] >= 21 and st["lost_total"] == 0
    assert st["alerts"]["secrets"] >= 1
    (out,) = st["outputs"]
    assert (out["kind"], out["connected"], out["lost"], out["backlog"]) == ("file", True, 0, 0)
    (t,) = st["targets"]
    assert t["name"] == str(dst) and t["connected"] is True and t["errors"] == 0 and t["batches"] >= 1
    assert t["lag_seconds"] >= 0 and "pending_paths" in t, "each target's lag and what it has still to send"
    text = kwatch_status(d.status_socket)
    assert text.returncode == 0, text.stderr
    first = text.stdout.splitlines()[0]
    assert first.startswith(f"kwatch run (pid {d.proc.pid}), up ") and f"config {conf}" in first
    assert "capture: bpf; cannot see: " in text.stdout and "io_uring" in text.stdout
    assert "alerts: secrets 1" in text.stdout
    assert f"target {dst}: connected, lag " in text.stdout and "output " in text.stdout
    assert d.stop() == 0
    assert not d.status_socket.exists(), "the socket goes with the daemon"
    gone = kwatch_status(d.status_socket)
    assert gone.returncode == 3 and "no running kwatch" in gone.stderr
