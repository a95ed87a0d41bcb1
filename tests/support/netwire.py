"""The wire between two test hosts of :mod:`netlab`: forwards Ethernet frames between two interfaces of its own
network namespace, delaying, jittering, dropping and reordering them as told.

This does what netem would: the kernels CI and the helpers run on are built without ``CONFIG_NET_SCH_NETEM`` (and
without fq/etf, the qdiscs that honour a departure time), so no in-kernel qdisc can hold a packet for a time. Rate
limits and partitions stay in the kernel (tbf and link state, set by :mod:`netlab` through pyroute2).

``python netwire.py IFACE_A IFACE_B`` (run inside the wire's namespace): prints ``ready`` once both packet sockets
are bound, then reads one JSON object per line on stdin with the shaping of both directions (``delay_ms`` one way,
``jitter_ms``, ``loss`` and ``reorder`` as fractions, ``seed``) and answers ``ok`` after applying it. Frames are
moved with their virtio-net header (``PACKET_VNET_HDR``), so checksum-offloaded and GSO frames cross intact. Ends on
EOF of stdin.
"""

from __future__ import annotations

import heapq
import json
import os
import random
import select
import socket
import sys
import time

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_VNET_HDR = 15
PACKET_OUTGOING = 4
VNET_HDR_LEN = 10  # struct virtio_net_hdr before each frame


def _open(ifname: str) -> socket.socket:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    s.bind((ifname, 0))
    s.setblocking(False)
    return s


def main(argv: list[str]) -> int:
    a, b = _open(argv[0]), _open(argv[1])
    peer = {a.fileno(): b, b.fileno(): a}
    shape = {"delay_ms": 0.0, "jitter_ms": 0.0, "loss": 0.0, "reorder": 0.0}
    rnd = random.Random(0)
    heap: list[tuple[float, int, socket.socket, bytes]] = []
    last_due = {a.fileno(): 0.0, b.fileno(): 0.0}  # per direction: without reordering, frames keep their order
    seq = 0
    forwarded = dropped = 0
    nbytes = {a.fileno(): 0, b.fileno(): 0}  # frame bytes forwarded, by the interface they came in on
    ctl = sys.stdin.buffer
    os.set_blocking(ctl.fileno(), False)
    pending = b""
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _due, _n, out, frame = heapq.heappop(heap)
            try:
                out.send(frame)
                forwarded += 1
            except OSError:  # link down (a partition) or the rate limiter's queue full: the frame is lost
                dropped += 1
        timeout = max(0.0, heap[0][0] - now) if heap else 1.0
        ready, _, _ = select.select([a, b, ctl], [], [], timeout)
        for s in ready:
            if s is ctl:
                chunk = os.read(ctl.fileno(), 65536)
                if not chunk:
                    return 0
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip() == b"stats":
                        print(json.dumps({"forwarded": forwarded, "dropped": dropped, "queued": len(heap),
                                          "bytes_a_to_b": nbytes[a.fileno()], "bytes_b_to_a": nbytes[b.fileno()]}),
                              flush=True)
                        continue
                    new = json.loads(line)
                    if "seed" in new:
                        rnd.seed(new.pop("seed"))
                    shape.update(new)
                    print("ok", flush=True)
                continue
            assert isinstance(s, socket.socket)
            out = peer[s.fileno()]
            for _ in range(256):  # a bounded drain per wakeup keeps the other direction and the heap served
                try:
                    frame, addr = s.recvfrom(70000)
                except BlockingIOError:
                    break
                except OSError:
                    break
                if addr[2] == PACKET_OUTGOING:  # our own sends show up on the socket too
                    continue
                nbytes[s.fileno()] += len(frame) - VNET_HDR_LEN
                if shape["loss"] and rnd.random() < shape["loss"]:
                    dropped += 1
                    continue
                now = time.monotonic()
                delay = shape["delay_ms"] / 1000.0
                if shape["jitter_ms"]:
                    delay = max(0.0, delay + rnd.uniform(-1.0, 1.0) * shape["jitter_ms"] / 1000.0)
                if shape["reorder"] and rnd.random() < shape["reorder"]:
                    due = now  # this one overtakes the frames queued before it (netem's reorder)
                else:
                    due = max(now + delay, last_due[s.fileno()])
                    last_due[s.fileno()] = due
                if due <= now and not heap:
                    try:
                        out.send(frame)
                        forwarded += 1
                    except OSError:
                        dropped += 1
                    continue
                seq += 1
                heapq.heappush(heap, (due, seq, out, frame))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
