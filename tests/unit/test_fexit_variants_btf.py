"""The choice between fexit programs written for different prototypes of one kernel function (vfs_mkdir returns an
int up to Linux 6.14, the new dentry since 6.15), made from BTF: checked on BTF that clang writes for each
prototype. The running kernel's choice is checked in tests/kernel/test_fexit_variants.py, on the host and in the
kernel matrix's guests (compiling is left out there: clang under emulation takes minutes)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from kwatch.capture.bpf import FEXIT_VARIANTS, variant_fits

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
