"""``kwatch doctor``: what this kernel allows, which backend ``auto`` picks and why, and what that backend cannot see.

Every answer comes from trying: a BPF map or program is created, loaded and attached (bpf/probes.bpf.c holds the
tiny programs), io_uring is set up, each capture backend is opened on the paths given. No kernel version number is
read to decide anything; ``uname`` is only printed.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kwatch.capture.base import CaptureError, CaptureFilter
from kwatch.capture.select import BACKENDS, BLIND_SPOTS, _open, blind_spots_key, describe
from kwatch.libc import io_uring_setup

TRACEFS_EVENTS = Path("/sys/kernel/tracing/events")
LSM_LIST = Path("/sys/kernel/security/lsm")
BPF_MAP_TYPE_RINGBUF = 27
SYS_IO_URING_SETUP = {"x86_64": 425, "aarch64": 425}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _libbpf_tail(e: BaseException) -> str:
    """The last line libbpf logged about a refusal (the useful one), else the message's first line."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head = lines[0]
    if os.geteuid() == 0:  # the hint for non-root is wrong here: the kernel itself refuses
        head = head.replace(" (BPF needs root or CAP_BPF+CAP_PERFMON)", " (refused by the kernel although root)")
    said = lines[lines.index("libbpf said:") + 1:] if "libbpf said:" in lines else []
    for key in ("load failed", "not found", "failed to create", "failed to attach", "failed to resolve"):
        hit = [ln for ln in said if key in ln]
        if hit:
            return f"{head}: {hit[0]}"
    return f"{head}: {said[-1]}" if said else head


def _probe_program(name: str, what: str) -> Check:
    """Load and attach the one program ``name`` of the probes object (the capture backend's own probe)."""
    from kwatch.capture.bpf import PROBES_OBJECT, probe_program

    why = probe_program(name)
    if why is None:
        return Check(what, True, f"loaded and attached ({name} of {PROBES_OBJECT.name})")
    if why.endswith("build it with `make bpf`"):
        return Check(what, False, why)
    return Check(what, False, _libbpf_tail(Exception(why)))


def _probe_ringbuf() -> Check:
    from kwatch.capture import libbpf

    try:
        lb = libbpf.lib()
        fd = lb.bpf_map_create(BPF_MAP_TYPE_RINGBUF, b"kw_doctor_rb", 0, 0, 4096, None)
    except (CaptureError, OSError, AttributeError) as e:
        return Check("ring buffer", False, _first_line(e))
    if fd < 0:
        err = ctypes.get_errno() or -fd
        return Check("ring buffer", False, f"BPF_MAP_TYPE_RINGBUF refused: {os.strerror(err)}")
    os.close(fd)
    return Check("ring buffer", True, "a BPF ring buffer map was created")


def _probe_io_uring() -> Check:
    nr = SYS_IO_URING_SETUP.get(os.uname().machine)
    if nr is None:
        return Check("io_uring", False, f"syscall number unknown on {os.uname().machine}")
    try:
        fd = io_uring_setup(nr, 4)
    except OSError as e:
        why = {errno.ENOSYS: "not built into this kernel", errno.EPERM: "disabled (kernel.io_uring_disabled)"}
        return Check("io_uring", False, why.get(e.errno or 0, os.strerror(e.errno or 0)))
    os.close(fd)
    return Check("io_uring", True, "io_uring_setup works: programs may do file operations through it")


def kernel_checks() -> list[Check]:
    out = [Check("root", os.geteuid() == 0, "running as root" if os.geteuid() == 0 else
                 "not root: BPF and fanotify need root (or CAP_BPF, CAP_PERFMON, CAP_SYS_ADMIN)")]
    btf = Path("/sys/kernel/btf/vmlinux")
    out.append(Check("BTF", btf.exists(), f"{btf} is there" if btf.exists() else f"{btf} is missing (CO-RE needs it)"))
    if os.geteuid() == 0:
        from kwatch.capture.bpf import ensure_mounts

        try:
            ensure_mounts()
        except CaptureError as e:
            out.append(Check("tracefs/bpffs", False, _first_line(e)))
        out.append(_probe_ringbuf())
        out.append(_probe_program("probe_tracepoint", "tracepoints"))
        out.append(_probe_program("probe_tp_btf", "BTF tracepoints"))
        out.append(_probe_program("probe_fentry", "fentry"))
        out.append(_probe_program("probe_fexit", "fexit"))
        lsms = LSM_LIST.read_text().strip() if LSM_LIST.exists() else ""
        out.append(Check("bpf in the active LSMs", "bpf" in lsms.split(","),
                         f"{LSM_LIST}: {lsms or 'unreadable'}"))
        out.append(_probe_program("probe_lsm", "BPF LSM"))
        out.append(_probe_program("probe_kprobe", "kprobes"))
        # the submission tracepoint under its name since 6.4, or the one before
        if (TRACEFS_EVENTS / "io_uring" / "io_uring_submit_req").is_dir():
            out.append(_probe_program("probe_io_uring_tp", "io_uring tracepoints"))
        elif (TRACEFS_EVENTS / "io_uring" / "io_uring_submit_sqe").is_dir():
            out.append(_probe_program("probe_io_uring_tp_old", "io_uring tracepoints"))
        else:
            out.append(Check("io_uring tracepoints", False,
                             "no io_uring/io_uring_submit_req or io_uring_submit_sqe tracepoint"))
    out.append(_probe_io_uring())
    return out


def backend_checks(roots: list[bytes]) -> tuple[dict[str, Check], dict[str, str]]:
    """Open each backend on ``roots`` as ``--backend NAME`` would; extra facts about the ones that opened (for bpf,
    ``extra["bpf hooks"]``: "bpf-vfs" when the kernel took the program on VFS hooks, else "bpf")."""
    out: dict[str, Check] = {}
    extra: dict[str, str] = {}
    filt = CaptureFilter.make(roots=roots)
    for name in BACKENDS:
        try:
            src = _open(name, filt)
        except (CaptureError, OSError, ImportError) as e:
            out[name] = Check(name, False, _libbpf_tail(e) if name == "bpf" else _first_line(e))
            continue
        try:
            detail = "opened"
            if name == "bpf":
                built = getattr(src, "object_path", None)
                refused = getattr(src, "refused", [])
                detail = f"loaded {built.name if built else '?'}: {describe(src)}"
                extra["bpf hooks"] = blind_spots_key(src)
                if refused:
                    detail += "; refused first: " + "; ".join(
                        f"{n}: {_libbpf_tail(Exception(m))}" for n, m in refused)
                skipped = getattr(src, "skipped", [])
                if skipped:
                    extra["bpf"] = "tracepoints absent here (those syscalls cannot happen): " + ", ".join(skipped)
            if name == "fanotify":
                detail = "FAN_REPORT_DFID_NAME | FAN_REPORT_TARGET_FID, FAN_MARK_FILESYSTEM on the paths' filesystems"
            out[name] = Check(name, True, detail)
        finally:
            src.close()
    return out, extra


def report(roots: list[bytes]) -> dict[str, Any]:
    u = os.uname()
    checks = kernel_checks()
    backends, extra = backend_checks(roots)
    auto = next((n for n in BACKENDS if backends[n].ok), None)
    why = [f"{n} refused: {backends[n].detail}" for n in BACKENDS[: BACKENDS.index(auto) if auto else None]
           if not backends[n].ok]
    hooks = extra.pop("bpf hooks", "bpf")
    key = hooks if auto == "bpf" else auto
    if auto == "bpf":
        why.insert(0, "on VFS hooks: fentry/fexit attach here" if hooks == "bpf-vfs" else
                   "on syscall tracepoints: the VFS hooks need fentry, which this kernel refuses")
    if auto:
        why.insert(0, f"{auto} is the first of {', '.join(BACKENDS)} that works here")
    return {
        "kernel": f"{u.release} {u.version}",
        "machine": u.machine,
        "paths": [os.fsdecode(r) for r in roots],
        "checks": [asdict(c) for c in checks],
        "backends": {n: asdict(c) for n, c in backends.items()},
        "notes": extra,
        "auto": auto,
        # "bpf-vfs" when auto is bpf on the VFS hooks (the key of its blind spots in BLIND_SPOTS)
        "auto_hooks": key,
        "why": why,
        "blind_spots": BLIND_SPOTS.get(key, []) if key else [],
    }


def _text(r: dict[str, Any]) -> str:
    lines = [f"kernel: {r['kernel']} ({r['machine']})", "", "what this kernel allows (each tried, not looked up):"]
    for c in r["checks"]:
        lines.append(f"  [{'ok' if c['ok'] else 'no'}] {c['name']}: {c['detail']}")
    lines += ["", f"capture backends on {', '.join(r['paths'])}:"]
    for n, c in r["backends"].items():
        lines.append(f"  [{'ok' if c['ok'] else 'no'}] {n}: {c['detail']}")
    for n, note in r["notes"].items():
        lines.append(f"       {n}: {note}")
    lines.append("")
    if r["auto"]:
        lines.append(f"--backend auto picks {r['auto']}: " + "; ".join(r["why"]))
        lines.append(f"what the {r['auto']} backend cannot see here:")
        lines += [f"  - {s}" for s in r["blind_spots"]]
    else:
        lines.append("no capture backend works here: " + "; ".join(r["why"]))
    return "\n".join(lines)


def cmd_doctor(args: argparse.Namespace) -> int:
    roots = [os.fsencode(os.path.abspath(p)) for p in (args.paths or ["/tmp"])]
    r = report(roots)
    if args.json:
        json.dump(r, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_text(r))
    return 0 if r["auto"] else 1


def add_commands(sub: Any) -> None:
    d = sub.add_parser("doctor", help="what this kernel allows, which backend auto picks and what it cannot see",
                       description="Probes the kernel by trying (BPF maps and programs loaded and attached, io_uring "
                       "set up, each backend opened on PATHs) and says which capture backend --backend auto picks, "
                       "why, and what that backend cannot see.")
    d.add_argument("paths", nargs="*", help="trees the backends are opened on (default: /tmp)")
    d.add_argument("--json", action="store_true", help="one JSON document")
    d.set_defaults(func=cmd_doctor)
