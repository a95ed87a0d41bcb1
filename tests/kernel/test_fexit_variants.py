"""The choice between fexit programs written for different prototypes of one kernel function (vfs_mkdir returns an
int up to Linux 6.14, the new dentry since 6.15), on the running kernel's BTF; the kernel matrix runs it in each
guest. The choice on BTF of each prototype: tests/unit/test_fexit_variants_btf.py. The programs themselves run in
the guests too (tests/kernel/test_capture_vfs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kwatch.capture import libbpf
from kwatch.capture.bpf import FEXIT_VARIANTS, variant_fits

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")


def test_the_running_kernel_gets_exactly_one_program_per_function() -> None:
    """On every kernel with BTF (this host's 6.18 returns the dentry, the matrix's 6.1 and 6.12 an int) each
    function with variants has exactly one program that fits, and it is the one of its return type."""
    if not VMLINUX_BTF.exists():
        pytest.fail(f"{VMLINUX_BTF} is missing: the BPF backend needs a kernel with BTF")
    for func in {f for f, _ in FEXIT_VARIANTS.values()}:
        kind = libbpf.func_return_kind(func)
        fitting = [prog for prog, (f, k) in FEXIT_VARIANTS.items() if f == func and variant_fits(prog)]
        assert fitting == [prog for prog, (f, k) in FEXIT_VARIANTS.items() if f == func and k == kind]
        assert len(fitting) == 1, (func, kind, fitting)


@pytest.mark.parametrize("obj", ["kwatch-vfs.bpf.o", "kwatch-vfs-probe-read.bpf.o"])
def test_every_program_on_a_function_with_variants_is_listed(obj: str) -> None:
    """A program on such a function that FEXIT_VARIANTS does not name would be loaded on every kernel, next to the
    right one: each of them must be listed, with the function its section names."""
    from kwatch.capture.bpf import VFS_OBJECT

    o = libbpf.BpfObject(str(VFS_OBJECT.with_name(obj)))
    try:
        on_funcs = {p.name: p.section.split("/", 1)[1] for p in o.programs()
                    if p.section.split("/", 1)[-1] in {f for f, _ in FEXIT_VARIANTS.values()}}
    finally:
        o.close()
    assert on_funcs == {prog: func for prog, (func, _) in FEXIT_VARIANTS.items()}
