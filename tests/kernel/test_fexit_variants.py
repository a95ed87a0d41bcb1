"""The choice between fexit programs written for different prototypes of one kernel function (vfs_mkdir returns an
int up to Linux 6.14, the new dentry since 6.15): made from BTF, checked here on BTF of each prototype and on the
running kernel's. The programs themselves run in the kernel matrix's guests (tests/kernel/test_capture_vfs.py)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kwatch.capture import libbpf
from kwatch.capture.bpf import FEXIT_VARIANTS, variant_fits

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

# C sources whose BTF declares vfs_mkdir with one prototype or the other (clang -g puts every function in BTF)
PROTOTYPES = {
    "int (6.14 and before)": ("int vfs_mkdir(void *idmap, void *dir, void *dentry, unsigned short mode)"
                              " { return 0; }", "kw_vfs_mkdir"),
    "typedef of int": ("typedef int err_t; err_t vfs_mkdir(void *idmap, void *dir, void *dentry,"
                       " unsigned short mode) { return 0; }", "kw_vfs_mkdir"),
    "dentry pointer (6.15 and later)": ("struct dentry { int x; }; struct dentry *vfs_mkdir(void *idmap, void *dir,"
                                        " struct dentry *dentry, unsigned short mode) { return dentry; }",
                                        "kw_vfs_mkdir_dentry"),
    "const dentry pointer": ("struct dentry { int x; }; struct dentry * const vfs_mkdir(void *idmap, void *dir,"
                             " struct dentry *dentry, unsigned short mode) { return dentry; }",
                             "kw_vfs_mkdir_dentry"),
    "no vfs_mkdir at all": ("int vfs_rmdir(void *idmap, void *dir, void *dentry) { return 0; }", None),
}


@pytest.mark.parametrize("case", list(PROTOTYPES))
def test_the_program_kept_is_the_one_of_the_prototype_in_btf(case: str, tmp_path: Path) -> None:
    clang = shutil.which("clang")
    assert clang, "clang is needed to build the BPF objects (make deps installs it)"
    src, wanted = PROTOTYPES[case]
    c = tmp_path / "proto.c"
    c.write_text(src + "\n")
    obj = tmp_path / "proto.o"
    subprocess.run([clang, "-g", "-O2", "-target", "bpf", "-c", str(c), "-o", str(obj)], check=True)
    fitting = [prog for prog, (func, _) in FEXIT_VARIANTS.items() if func == "vfs_mkdir"
               and variant_fits(prog, str(obj))]
    assert fitting == ([wanted] if wanted else [])


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
