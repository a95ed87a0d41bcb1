"""The action runner with real processes: caps, timeouts that kill the whole group, debounce, batches, the pid
callback, dry runs, and a real hot folder (the brief's OPENW rule with ImageMagick's convert).

Time is a fake clock advanced by the tests; waits for real processes are bounded loops, never timed assertions."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from kwatch.actions.runner import Result, Runner, Started
from kwatch.events import FileEvent, Op
from kwatch.rules import Config, parse_config
from kwatch.rules.match import match_config
from kwatch.rules.shell import chunk_args


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt


def config(text: str) -> Config:
    cfg, errs = parse_config(text, "test.toml", toml=True)
    assert cfg is not None, errs
    return cfg


def rule(match: str, run: str, on: str = "CLOSEW", **opts: object) -> str:
    extra = "".join(f"{k} = {v!r}\n".replace("'", '"') if not isinstance(v, bool) else f"{k} = {str(v).lower()}\n" for k, v in opts.items())
    return f"[[rule]]\nmatch = '{match}'\non = '{on}'\nrun = '''{run}'''\n{extra}"


def submit(runner: Runner, cfg: Config, path: bytes, op: Op = Op.CLOSE_WRITE, pid: int | None = None) -> None:
    matches = match_config(cfg, FileEvent(op, path, pid=pid))
    assert matches, path
    runner.submit_all(matches)


def wait_until(runner: Runner, cond: Callable[[], bool], results: list[Result] | None = None, limit: float = 60.0) -> None:
    """Drive the runner until cond() holds; the limit only turns a hang into a failure."""
    end = time.monotonic() + limit
    while not cond():
        got = runner.wait(0.05)
        if results is not None:
            results.extend(got)
        assert time.monotonic() < end, "condition not reached"


def zombie_children() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            data = Path(f"/proc/{d}/stat").read_bytes()
        except OSError:
            continue
        fields = data[data.rfind(b")") + 2 :].split()
        if fields[0] == b"Z" and int(fields[1]) == os.getpid():
            out.append(int(d))
    return out


def dead(pid: int) -> bool:
    try:
        data = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return True
    return data[data.rfind(b")") + 2 :].split()[0] in (b"Z", b"X")


@pytest.fixture
def env(tmp_path: Path) -> dict[bytes, bytes]:
    return {b"PATH": b"/usr/bin:/bin", b"KW_DIR": bytes(tmp_path)}


@pytest.fixture(autouse=True)
def no_zombies() -> object:
    yield
    assert zombie_children() == []


def test_exit_status_and_stderr(env: dict[bytes, bytes]) -> None:
    cfg = config(rule("^/x", "echo to-out; echo oops >&2; exit 3"))
    results: list[Result] = []
    r = Runner(env=env, stdout="capture", on_result=results.append)
    submit(r, cfg, b"/x/a")
    assert r.run_until_idle() == results
    (res,) = results
    assert (res.returncode, res.stderr, res.stdout, res.ok, res.timed_out) == (3, b"oops\n", b"to-out\n", False, False)
    assert res.files == (b"/x/a",)


def test_start_failure_is_a_result(env: dict[bytes, bytes]) -> None:
    cfg = config(rule("^/x", "true"))
    r = Runner(env=env, shell="/nonexistent/sh")
    submit(r, cfg, b"/x/a")
    (res,) = r.run_until_idle()
    assert res.error is not None and "nonexistent" in res.error and not res.ok


def test_dry_run_runs_nothing(env: dict[bytes, bytes], tmp_path: Path) -> None:
    cfg = config(rule("^/x", "touch $KW_DIR/canary"))
    started: list[Started] = []
    r = Runner(env=env, dry_run=True, on_start=started.append)
    submit(r, cfg, b"/x/a")
    (res,) = r.run_until_idle()
    assert res.dry_run and res.pid is None and started == []
    assert res.spec.argv == (b"/bin/sh", b"-c", b"touch $KW_DIR/canary", b"kwatch", b"/x/a")
    assert res.spec.env[b"KW_DIR"] == bytes(tmp_path)
    assert not (tmp_path / "canary").exists()


def test_pid_callback_is_the_group_and_session(env: dict[bytes, bytes], tmp_path: Path) -> None:
    cfg = config(
        rule("^/x", "echo $$ > $KW_DIR/pid; cut -d' ' -f5,6 /proc/$$/stat > $KW_DIR/pgid_sid", retrigger=True)
        + rule("^/y", "true")
    )
    started: list[Started] = []
    r = Runner(env=env, on_start=started.append)
    submit(r, cfg, b"/x/a")
    submit(r, cfg, b"/y/b")
    results = r.run_until_idle()
    assert sorted(s.pid for s in started) == sorted(res.pid for res in results if res.pid is not None)
    sx = next(s for s in started if s.files == (b"/x/a",))
    sy = next(s for s in started if s.files == (b"/y/b",))
    assert (sx.retrigger, sy.retrigger) == (True, False)
    pid = int((tmp_path / "pid").read_text())
    assert pid == sx.pid
    assert (tmp_path / "pgid_sid").read_text().split() == [str(pid), str(pid)]


BLOCK = (
    "touch $KW_DIR/{tag}.run.$$; ls $KW_DIR | grep -c '^{tag}\\.run\\.' >> $KW_DIR/{tag}.counts; "
    "while [ ! -e $KW_DIR/release ]; do sleep 0.01; done; rm $KW_DIR/{tag}.run.$$"
)


def running_markers(d: Path, tag: str) -> int:
    return len(list(d.glob(f"{tag}.run.*")))


def test_global_cap(env: dict[bytes, bytes], tmp_path: Path) -> None:
    cfg = config("[runner]\nmax_concurrency = 3\n" + rule("^/x", BLOCK.format(tag="a"), concurrency=10))
    r = Runner.from_config(cfg, env=env)
    for i in range(10):
        submit(r, cfg, f"/x/{i}".encode())
    r.poll()
    assert (r.running, r.scheduler.waiting) == (3, 7)
    wait_until(r, lambda: running_markers(tmp_path, "a") == 3)
    (tmp_path / "release").touch()
    results = r.run_until_idle()
    assert len(results) == 10 and all(res.ok for res in results)
    counts = [int(x) for x in (tmp_path / "a.counts").read_text().split()]
    assert len(counts) == 10 and max(counts) == 3


def test_per_rule_cap_does_not_block_other_rules(env: dict[bytes, bytes], tmp_path: Path) -> None:
    cfg = config(rule("^/a/", BLOCK.format(tag="a"), concurrency=2) + rule("^/b/", BLOCK.format(tag="b"), concurrency=1))
    r = Runner(env=env, max_concurrency=8)
    for i in range(5):
        submit(r, cfg, f"/a/{i}".encode())
        submit(r, cfg, f"/b/{i}".encode())
    r.poll()
    assert r.running == 3
    wait_until(r, lambda: running_markers(tmp_path, "a") == 2 and running_markers(tmp_path, "b") == 1)
    (tmp_path / "release").touch()
    assert len(r.run_until_idle()) == 10
    assert max(int(x) for x in (tmp_path / "a.counts").read_text().split()) == 2
    assert max(int(x) for x in (tmp_path / "b.counts").read_text().split()) == 1


def test_timeout_kills_the_whole_group(env: dict[bytes, bytes], tmp_path: Path) -> None:
    # The leader dies of SIGTERM; its grandchild ignores SIGTERM and must still be gone (SIGKILL to the group).
    cmd = (
        "sh -c 'trap \"\" TERM; echo $$ > $KW_DIR/gc; while :; do sleep 1; done' & "
        "echo $$ > $KW_DIR/leader; wait"
    )
    clock = FakeClock()
    cfg = config(rule("^/x", cmd, timeout=5, kill_grace=3))
    r = Runner(env=env, clock=clock)
    submit(r, cfg, b"/x/a")
    r.poll()
    wait_until(r, lambda: (tmp_path / "gc").exists() and (tmp_path / "gc").read_text().strip() != "")
    gc = int((tmp_path / "gc").read_text())
    assert r.next_deadline() == clock.t + 5
    clock.advance(5)
    results: list[Result] = []
    wait_until(r, lambda: bool(results), results)
    (res,) = results
    assert res.timed_out and res.returncode == -15
    wait_until(r, lambda: dead(gc))


def test_timeout_then_sigkill_for_a_leader_that_ignores_sigterm(env: dict[bytes, bytes], tmp_path: Path) -> None:
    cmd = "trap '' TERM; echo $$ > $KW_DIR/leader; while :; do sleep 1; done"
    clock = FakeClock()
    cfg = config(rule("^/x", cmd, timeout=5, kill_grace=3))
    r = Runner(env=env, clock=clock)
    submit(r, cfg, b"/x/a")
    r.poll()
    wait_until(r, lambda: (tmp_path / "leader").exists() and (tmp_path / "leader").read_text().strip() != "")
    clock.advance(5)
    assert r.poll() == []  # SIGTERM sent, ignored
    assert r.next_deadline() == clock.t + 3
    clock.advance(3)
    results: list[Result] = []
    wait_until(r, lambda: bool(results), results)
    (res,) = results
    assert res.timed_out and res.returncode == -9


def test_debounce_collapses_a_burst(env: dict[bytes, bytes], tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = config(rule("^/x", "echo $KWATCH_PID >> $KW_DIR/runs", debounce=0.5))
    started: list[Started] = []
    r = Runner(env=env, clock=clock, on_start=started.append)
    for i in range(50):
        submit(r, cfg, b"/x/hot.jpg", pid=100 + i)
        submit(r, cfg, b"/x/other.jpg", pid=1)
        assert r.poll() == [] and started == []
        clock.advance(0.01)
    assert r.next_deadline() == pytest.approx(clock.t - 0.01 + 0.5)
    clock.advance(0.5)
    results = r.run_until_idle()
    assert len(started) == 2
    hot = next(res for res in results if res.files == (b"/x/hot.jpg",))
    assert hot.coalesced == 50
    assert sorted((tmp_path / "runs").read_text().split()) == ["1", "149"]  # the latest event of each burst


def test_debounce_max_bounds_the_wait() -> None:
    clock = FakeClock()
    t0 = clock.t
    cfg = config(rule("^/x", "true", debounce=0.5, debounce_max=2))
    r = Runner(env={}, clock=clock, dry_run=True)
    starts: list[float] = []
    for _ in range(40):  # an event every 0.25 s: the 0.5 s of quiet never comes
        submit(r, cfg, b"/x/log")
        starts.extend(res.started - t0 for res in r.poll())
        clock.advance(0.25)
    assert starts == [2.0, 4.25, 6.5, 8.75]


def test_one_run_per_file_at_a_time(env: dict[bytes, bytes], tmp_path: Path) -> None:
    cfg = config(rule("^/x", BLOCK.format(tag="f"), concurrency=5))
    started: list[Started] = []
    r = Runner(env=env, on_start=started.append)
    submit(r, cfg, b"/x/same")
    r.poll()
    submit(r, cfg, b"/x/same")
    submit(r, cfg, b"/x/same")
    r.poll()
    assert len(started) == 1 and r.scheduler.waiting == 1  # the second and third coalesce, and wait
    (tmp_path / "release").touch()
    results = r.run_until_idle()
    assert len(started) == 2 and [res.coalesced for res in results] == [1, 2]
    assert max(int(x) for x in (tmp_path / "f.counts").read_text().split()) == 1


def read_nul_lists(d: Path, prefix: str) -> list[bytes]:
    files: list[bytes] = []
    for p in sorted(d.glob(prefix + ".*")):
        data = p.read_bytes()
        assert data.endswith(b"\0")
        files.extend(data[:-1].split(b"\0"))
    return files


def test_batch_args_chunked_under_arg_max(env: dict[bytes, bytes], tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = config(rule("^/drop/", "printf '%s\\0' _FILES_ > $KW_DIR/args.$$", on="CREATE", batch="args", batch_window=1))
    r = Runner(env=env, clock=clock, arg_max=64 * 1024)
    files = [f"/drop/dir {i // 100}/file {i:05d} 'q'.txt".encode() for i in range(3000)] + [b"/drop/caf\xe9\n*"]
    for f in files + files[:500]:  # a file created twice is still listed once
        submit(r, cfg, f, Op.CREATE)
    assert r.poll() == []
    clock.advance(1)
    results = r.run_until_idle()
    spec = results[0].spec
    expected_chunks = len(chunk_args(files, spec.argv[:4], spec.env, 64 * 1024))
    assert 1 < len(results) == expected_chunks <= 6
    assert all(res.ok for res in results)
    got = read_nul_lists(tmp_path, "args")
    assert len(got) == len(files) and sorted(got) == sorted(files)
    assert sum(res.coalesced for res in results) == 3501


def test_batch_stdin(env: dict[bytes, bytes], tmp_path: Path) -> None:
    clock = FakeClock()
    cfg = config(rule("^/t/", "cat > $KW_DIR/in.$$", on="CREATE", batch="stdin", batch_window=5, batch_max=1000))
    r = Runner(env=env, clock=clock)
    files = [f"/t/{i}\nx".encode() for i in range(2500)]
    for f in files:
        submit(r, cfg, f, Op.CREATE)
    assert len(r.poll()) == 0 and r.running == 2  # two batches are full and started at once
    results = r.run_until_idle()  # the rest is flushed
    assert len(results) == 3
    got = read_nul_lists(tmp_path, "in")
    assert sorted(got) == sorted(files) and len(got) == 2500


CONVERT_RULE = r"""RULE ^/export/home/image-converter.*\.jpg$
OPENW  /usr/bin/convert _FILE_ `dirname _FILE_`/`basename _FILE_ .jpg`.png
"""


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/convert"), reason="needs root and ImageMagick")
def test_hot_folder_convert_verbatim_rule() -> None:
    made_export = not os.path.exists("/export")
    folder = Path(f"/export/home/image-converter-kwatch-test-{os.getpid()}")
    try:
        folder.mkdir(parents=True)
        jpg = folder / "my \"holiday\" pic's 1 $(touch canary).jpg"
        subprocess.run(["/usr/bin/convert", "-size", "16x16", "xc:blue", str(jpg)], check=True)
        cfg, errs = parse_config(CONVERT_RULE, "changedfiles.conf", toml=False)
        assert cfg is not None and errs == []
        r = Runner.from_config(cfg)
        ms = match_config(cfg, FileEvent(Op.CLOSE_WRITE, bytes(jpg), pid=1234))
        assert len(ms) == 1
        r.submit_all(ms)
        (res,) = r.run_until_idle()
        assert res.ok, res.stderr
        png = folder / "my \"holiday\" pic's 1 $(touch canary).png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert sorted(p.name for p in folder.iterdir()) == sorted([jpg.name, png.name])  # no canary, no stray file
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if made_export:
            shutil.rmtree("/export", ignore_errors=True)
