"""The ring buffer positions are shared with producers on other CPUs: each store must be one 8-byte access.

A reader in C (the kernel's side of the contract: one 8-byte load, as __bpf_ringbuf_reserve does) watches a shared
page while Python stores two values that differ in every byte. A torn store shows up as a third value. The control
case stores byte by byte and must be caught; ``struct.pack_into`` did the same in CPython, and producers that read a
half-written consumer position failed their reserves with the ring nearly empty.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from kwatch.capture.ringbuf import u64_cell

READER = r"""
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>
int main(int argc, char **argv)
{
	int fd = open(argv[1], O_RDONLY);
	uint64_t a = strtoull(argv[2], 0, 0), b = strtoull(argv[3], 0, 0);
	long want = atol(argv[4]), limit = atol(argv[5]), na = 0, nb = 0, other = 0, changes = 0;
	const uint64_t *p = mmap(0, 4096, PROT_READ, MAP_SHARED, fd, 0);
	if (fd < 0 || p == MAP_FAILED)
		return 2;
	puts("ready");
	fflush(stdout);
	struct timespec t0, t;
	clock_gettime(CLOCK_MONOTONIC, &t0);
	uint64_t last = a;
	/* until the value changed under us often enough (the two really ran at once), or for argv[5] seconds */
	for (long i = 1; changes < want; i++) {
		uint64_t v = __atomic_load_n(p, __ATOMIC_ACQUIRE);
		if (v != last)
			changes++;
		last = v;
		if (v == a) na++; else if (v == b) nb++; else other++;
		if (!(i & 0xfffff)) {
			clock_gettime(CLOCK_MONOTONIC, &t);
			if (t.tv_sec - t0.tv_sec > limit)
				break;
		}
	}
	printf("%ld %ld %ld %ld\n", na, nb, other, changes);
	return 0;
}
"""
# every byte differs, and the carry from A to B crosses every byte boundary
A = 0x00FF_FFFF_FFFF_FFF8
B = 0x0100_0000_0000_0010
# value changes the reader must see (each proves the two ran at once); a loaded machine takes longer, not fails
CHANGES = 2000


@pytest.fixture(scope="module")
def reader(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cc = shutil.which("cc") or shutil.which("clang")
    if cc is None:
        pytest.fail("no C compiler (make deps installs clang)")
    d = tmp_path_factory.mktemp("reader")
    (d / "reader.c").write_text(READER)
    subprocess.run([cc, "-O2", "-o", str(d / "reader"), str(d / "reader.c")], check=True)
    return d / "reader"


def _store_cell(mm: mmap.mmap) -> Callable[[int], None]:
    cell = u64_cell(mm)

    def store(v: int) -> None:
        cell[0] = v

    return store


def _store_bytewise(mm: mmap.mmap) -> Callable[[int], None]:
    def store(v: int) -> None:
        for i, b in enumerate(v.to_bytes(8, "little")):
            mm[i] = b

    return store


def _race(reader: Path, tmp_path: Path, make_store: Callable[[mmap.mmap], Callable[[int], None]]) -> tuple[int, ...]:
    page = tmp_path / "page"
    page.write_bytes(A.to_bytes(8, "little") + bytes(4088))
    fd = os.open(page, os.O_RDWR)
    mm = mmap.mmap(fd, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    store = make_store(mm)
    # the two overlap only when both have a CPU: on a busy 2-core machine that takes longer (20 s once saw 1,297
    # changes), so the reader may watch for up to 180 s; it stops as soon as it has seen enough
    proc = subprocess.Popen([str(reader), str(page), hex(A), hex(B), str(CHANGES), "180"], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        while proc.poll() is None:
            for _ in range(2000):
                store(B)
                store(A)
        counts = tuple(int(x) for x in proc.stdout.read().split())
    finally:
        proc.kill()
        proc.wait()
        del store
        mm.close()
        os.close(fd)
    assert len(counts) == 4, counts
    assert counts[3] >= CHANGES, f"the writer and the reader hardly ran at the same time: {counts}"
    return counts[:3]


def test_byte_wise_stores_are_caught(reader: Path, tmp_path: Path) -> None:
    """The control: the reader does see a store that goes byte by byte."""
    _, _, torn = _race(reader, tmp_path, _store_bytewise)
    assert torn > 0


def test_position_store_is_one_access(reader: Path, tmp_path: Path) -> None:
    _, _, torn = _race(reader, tmp_path, _store_cell)
    assert torn == 0


@pytest.mark.parametrize("offset", [1, 4, 12])
def test_unaligned_cell_is_refused(offset: int) -> None:
    with pytest.raises(ValueError, match="aligned"):
        u64_cell(memoryview(bytearray(32)), offset)
