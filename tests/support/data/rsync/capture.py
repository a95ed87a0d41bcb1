"""Capture golden bytes of a real rsync push: the real ``rsync`` client talks to the real daemon through a
loopback TCP proxy that records both directions.

Run from the repository root (as root, Debian rsync installed)::

    .venv/bin/python tests/data/rsync/capture.py

It writes, for each protocol version in PROTOCOLS, ``push-pNN.c2s`` (client to daemon bytes) and
``push-pNN.s2c`` (daemon to client bytes), and ``tree.json`` describing the pushed tree. A fixed
``--checksum-seed`` keeps the daemon's side deterministic apart from the stats it sends. ``hlink-pNN.c2s`` is a
push with ``-H --no-inc-recursive`` (one file list, as kwatch sends it) of HLINK_TREE, whose names ``a``, ``b``
and ``d/c`` are one inode and ``x``, ``y`` another.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))  # tests/support, for rsyncd.py

from rsyncd import RsyncDaemon  # noqa: E402

PROTOCOLS = (30, 31)
MTIME = 1_700_000_000

# name (bytes, hex in json) -> (kind, mode, content-or-target)
TREE: list[tuple[bytes, str, int, bytes]] = [
    (b"a.txt", "file", 0o644, b"hello rsync\n"),
    (b"empty", "file", 0o600, b""),
    (b"exec.sh", "file", 0o755, b"#!/bin/sh\necho hi\n"),
    (b"sub", "dir", 0o755, b""),
    (b"sub/big.bin", "file", 0o644, bytes(range(256)) * 600),
    (b"sub/link", "symlink", 0o777, b"../a.txt"),
    (b"caf\xe9-latin1", "file", 0o640, b"non-utf8 name\n"),
]


HLINK_TREE: list[tuple[bytes, bytes | None]] = [  # (name, content; None: a hard link of the previous file)
    (b"a", b"first inode\n"), (b"b", None), (b"d/c", None), (b"lone", b"one name\n"),
    (b"x", b"second inode\n"), (b"y", None),
]


def build_hlink_tree(root: Path) -> None:
    os.mkdir(os.path.join(bytes(root), b"d"))
    first = b""
    for name, data in HLINK_TREE:
        p = os.path.join(bytes(root), name)
        if data is None:
            os.link(first, p)
            continue
        with open(p, "wb") as f:
            f.write(data)
        os.utime(p, (MTIME, MTIME))
        first = p
    os.utime(os.path.join(bytes(root), b"d"), (MTIME, MTIME))
    os.utime(root, (MTIME, MTIME))


def build_tree(root: Path) -> None:
    for name, kind, mode, data in TREE:
        p = os.path.join(bytes(root), name)
        if kind == "dir":
            os.mkdir(p, mode)
        elif kind == "file":
            with open(p, "wb") as f:
                f.write(data)
            os.chmod(p, mode)
        else:
            os.symlink(data, p)
    for name, kind, _mode, _data in reversed(TREE):
        p = os.path.join(bytes(root), name)
        os.utime(p, ns=(MTIME * 10**9, MTIME * 10**9), follow_symlinks=kind != "symlink")
    os.utime(root, (MTIME, MTIME))


def proxy_once(listener: socket.socket, upstream_port: int, c2s: bytearray, s2c: bytearray) -> None:
    client, _ = listener.accept()
    server = socket.create_connection(("127.0.0.1", upstream_port), timeout=10)
    open_ends = {client: (server, c2s), server: (client, s2c)}
    while open_ends:
        readable, _, _ = select.select(list(open_ends), [], [], 20)
        if not readable:
            break
        for s in readable:
            peer, log = open_ends[s]
            data = s.recv(65536)
            if not data:
                del open_ends[s]
                with contextlib.suppress(OSError):
                    peer.shutdown(socket.SHUT_WR)
                continue
            log += data
            peer.sendall(data)
    client.close()
    server.close()


def capture(proto: int, daemon: RsyncDaemon, src: Path, options: tuple[str, ...] = ()) -> tuple[bytes, bytes]:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    c2s, s2c = bytearray(), bytearray()
    t = threading.Thread(target=proxy_once, args=(listener, daemon.port, c2s, s2c))
    t.start()
    subprocess.run(
        ["rsync", "-rlpt", *options, "--delete", f"--protocol={proto}", "--checksum-seed=305419896",
         f"{src}/", f"rsync://127.0.0.1:{port}/push/"],
        check=True, timeout=30,
    )
    t.join(30)
    listener.close()
    return bytes(c2s), bytes(s2c)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        build_tree(src)
        with RsyncDaemon(Path(tmp) / "d") as daemon:
            for proto in PROTOCOLS:
                for p in daemon.module_path("push").iterdir():
                    subprocess.run(["rm", "-rf", str(p)], check=True)
                c2s, s2c = capture(proto, daemon, src)
                (HERE / f"push-p{proto}.c2s").write_bytes(c2s)
                (HERE / f"push-p{proto}.s2c").write_bytes(s2c)
        hsrc = Path(tmp) / "hsrc"
        hsrc.mkdir()
        build_hlink_tree(hsrc)
        with RsyncDaemon(Path(tmp) / "hd") as daemon:
            for proto in PROTOCOLS:
                for p in daemon.module_path("push").iterdir():
                    subprocess.run(["rm", "-rf", str(p)], check=True)
                c2s, _ = capture(proto, daemon, hsrc, ("-H", "--no-inc-recursive"))
                (HERE / f"hlink-p{proto}.c2s").write_bytes(c2s)
    (HERE / "tree.json").write_text(json.dumps(
        {"mtime": MTIME, "checksum_seed": 305419896,
         "entries": [{"name": n.hex(), "kind": k, "mode": m, "data": d.hex() if k != "file" or len(d) < 64 else None,
                      "size": len(d)} for n, k, m, d in TREE]}, indent=1))


if __name__ == "__main__":
    main()
