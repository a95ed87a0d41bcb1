"""What ``pip install .`` builds beyond the pure Python: the record decoder's C extension, and the CO-RE BPF object
(one object serves every kernel with BTF) through the Makefile's rule, when the tree does not hold it already.
The toolchain (clang, llvm-strip, bpftool, the kernel's BTF) must be there; ``make deps`` installs it on Debian.
``make -o deps`` builds the object without the Makefile's own Debian package step: pip never runs apt-get.
"""

import os
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

BPF_OBJ = "kwatch/capture/kwatch.bpf.o"


class BuildPyWithBpf(build_py):
    def run(self) -> None:
        if not os.path.exists(BPF_OBJ):
            subprocess.run(["make", "-o", "deps", "bpf"], check=True)
        super().run()


setup(
    ext_modules=[
        # the BPF consumer falls back to its Python decoder without it (kwatch/capture/record.py)
        Extension("kwatch.capture._recordc", ["kwatch/capture/_recordc.c"], include_dirs=["bpf"], optional=True),
        # the rsync client falls back to its Python file-list encoder without it (kwatch/protocols/rsync/flist.py)
        Extension("kwatch.protocols.rsync._flistc", ["kwatch/protocols/rsync/_flistc.c"], optional=True),
    ],
    cmdclass={"build_py": BuildPyWithBpf},
)
