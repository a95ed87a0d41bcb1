# kwatch — every entry point installs what it needs first (Debian packages, .venv, the BPF object).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
BUILD := build
BPF_OBJ := kwatch/capture/kwatch.bpf.o
# the same program reading kernel memory with one helper call per field, for kernels without the bpf_rdonly_cast()
# kfunc (before 6.2: Debian 12's 6.1); the loader takes the first object the kernel accepts (bpf/kw_kread.h)
BPF_OBJ_PR := kwatch/capture/kwatch-probe-read.bpf.o
# the same capture on VFS functions (fentry/fexit), loaded first where the kernel allows them (bpf/kwatch_vfs.bpf.c),
# in the same two builds
BPF_VFS := kwatch/capture/kwatch-vfs.bpf.o
BPF_VFS_PR := kwatch/capture/kwatch-vfs-probe-read.bpf.o
# the tiny programs `kwatch doctor` tries to load and attach (bpf/probes.bpf.c)
BPF_PROBES := kwatch/capture/kwatch-probes.bpf.o
BPF_SRC := bpf/kwatch.bpf.c $(wildcard bpf/*.h)
BPF_VFS_SRC := bpf/kwatch_vfs.bpf.c $(wildcard bpf/*.h)
# the BPF consumer's record decoder in C (kwatch/capture/record.py falls back to Python without it)
EXT := kwatch/capture/_recordc.so
# the rsync client's file-list encoder in C (kwatch/protocols/rsync/flist.py falls back to Python without it)
EXT_FLIST := kwatch/protocols/rsync/_flistc.so
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')

# Debian packages: the BPF toolchain, and the real peers the tests start themselves.
DEB_PKGS := clang llvm libbpf-dev bpftool python3-dev rsync openssh-server openssh-client inotify-tools imagemagick \
  nats-server systemd
# ... and the anchors the benchmarks compare against (gcc builds the churn workload)
BENCH_PKGS := fatrace auditd bpftrace lsyncd gcc
# ... and what the kernel matrix boots its guests with (vagrant/matrix.py: virtme-ng runs QEMU; udev and kmod are
# needed in the guest, busybox-static builds its initramfs)
KERNEL_PKGS := qemu-system-x86 udev kmod busybox-static

.PHONY: all deps bench-deps kernel-deps venv bpf ext mounts test test-loaded test-kernels soak run check lint typecheck bench bench-quick bench-capture bench-replicate clean install

all: bpf ext venv

# $(call apt_install,PACKAGES,WHAT): install those of PACKAGES that dpkg does not know yet
define apt_install
	@missing=$$(for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages$(2): $$missing"; \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get update -qq && apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

$(BUILD)/.deps-stamp: Makefile
	@mkdir -p $(BUILD)
	$(call apt_install,$(DEB_PKGS),)
	@touch $@

deps: $(BUILD)/.deps-stamp

$(BUILD)/.bench-deps-stamp: Makefile | deps
	$(call apt_install,$(BENCH_PKGS), for the benchmarks)
	@touch $@

$(VENV)/.bench-stamp: pyproject.toml | venv
	$(VPY) -m pip install -q -e '.[test,bench]'
	@touch $@

bench-deps: $(BUILD)/.bench-deps-stamp $(VENV)/.bench-stamp

$(BUILD)/.kernel-deps-stamp: Makefile | deps
	$(call apt_install,$(KERNEL_PKGS), for the kernel matrix)
	@touch $@

$(VENV)/.kernels-stamp: pyproject.toml | venv
	$(VPY) -m pip install -q -e '.[test,kernels]'
	@touch $@

# the Debian packages and virtme-ng, then the pinned kernels of vagrant/kernels.txt, or those of KERNELS (downloaded
# once, unpacked into /var/lib/kwatch-kernels, never installed)
kernel-deps: $(BUILD)/.kernel-deps-stamp $(VENV)/.kernels-stamp
	$(VPY) vagrant/matrix.py fetch $(KERNELS)

$(VENV)/.stamp: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	@touch $@

venv: $(VENV)/.stamp

$(BUILD)/vmlinux.h: | deps
	@mkdir -p $(BUILD)
	bpftool btf dump file /sys/kernel/btf/vmlinux format c > $@.tmp && mv $@.tmp $@

$(BPF_OBJ): $(BPF_SRC) $(BUILD)/vmlinux.h | deps
	clang -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(ARCH) -I$(BUILD) -Ibpf -c bpf/kwatch.bpf.c -o $(BUILD)/kwatch.bpf.o
	# drop DWARF, keep .BTF/.BTF.ext (CO-RE relocations need them)
	llvm-strip -g $(BUILD)/kwatch.bpf.o -o $@

$(BPF_OBJ_PR): $(BPF_SRC) $(BUILD)/vmlinux.h | deps
	clang -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(ARCH) -DKW_PROBE_READ -I$(BUILD) -Ibpf -c bpf/kwatch.bpf.c \
	  -o $(BUILD)/kwatch-probe-read.bpf.o
	llvm-strip -g $(BUILD)/kwatch-probe-read.bpf.o -o $@

$(BPF_VFS): $(BPF_VFS_SRC) $(BUILD)/vmlinux.h | deps
	clang -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(ARCH) -I$(BUILD) -Ibpf -c bpf/kwatch_vfs.bpf.c -o $(BUILD)/kwatch-vfs.bpf.o
	llvm-strip -g $(BUILD)/kwatch-vfs.bpf.o -o $@

$(BPF_VFS_PR): $(BPF_VFS_SRC) $(BUILD)/vmlinux.h | deps
	clang -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(ARCH) -DKW_PROBE_READ -I$(BUILD) -Ibpf -c bpf/kwatch_vfs.bpf.c \
	  -o $(BUILD)/kwatch-vfs-probe-read.bpf.o
	llvm-strip -g $(BUILD)/kwatch-vfs-probe-read.bpf.o -o $@

$(BPF_PROBES): bpf/probes.bpf.c $(BUILD)/vmlinux.h | deps
	clang -g -O2 -Wall -target bpf -D__TARGET_ARCH_$(ARCH) -I$(BUILD) -Ibpf -c $< -o $(BUILD)/kwatch-probes.bpf.o
	llvm-strip -g $(BUILD)/kwatch-probes.bpf.o -o $@

bpf: $(BPF_OBJ) $(BPF_OBJ_PR) $(BPF_VFS) $(BPF_VFS_PR) $(BPF_PROBES)

$(EXT): kwatch/capture/_recordc.c bpf/kwatch.h | deps venv
	clang -O2 -Wall -Wextra -Wno-unused-parameter -shared -fPIC -Ibpf \
	  -I"$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" $< -o $@

$(EXT_FLIST): kwatch/protocols/rsync/_flistc.c | deps venv
	clang -O2 -Wall -Wextra -Wno-unused-parameter -shared -fPIC \
	  -I"$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["include"])')" $< -o $@

ext: $(EXT) $(EXT_FLIST)

# tracefs and bpffs are mounted by the loader too; this makes them visible to bpftool while debugging.
mounts:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing || true
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf || true

# extra pytest arguments (CI passes --no-skips)
PYTEST_ARGS ?=

test: deps venv bpf ext mounts
	$(VPY) -m pytest -q $(PYTEST_ARGS)

# the whole suite while another process keeps every core busy (tests/support/cpuhog.py: bounded, killed at the end), so a
# test that only passes on an idle machine shows up here
test-loaded: deps venv bpf ext mounts
	$(VPY) tests/support/cpuhog.py -- $(VPY) -m pytest -q $(PYTEST_ARGS)

# a seeded random schedule of the fault matrix's faults through the test network (tests/support/soak.py), split between the
# agent over ssh and rsync://; longer with SOAK_MINUTES=30, another schedule with SOAK_SEED=N
SOAK_MINUTES ?= 2
SOAK_SEED ?= 1
soak: deps venv bpf ext mounts
	$(VPY) tests/support/soak.py --minutes $(SOAK_MINUTES) --seed $(SOAK_SEED)

# the kernel-facing tests inside each kernel of vagrant/kernels.txt booted under QEMU (vagrant/matrix.py); reports
# in build/kernel-matrix/. Extra pytest arguments: make test-kernels KERNEL_PYTEST_ARGS="-k fanotify"; KERNEL_JOBS
# guests at a time (1: on a 2-core machine two emulated guests only slow each other down)
KERNEL_PYTEST_ARGS ?=
KERNEL_JOBS ?= 1
# KERNEL_SET=ci: only the tests whose outcome depends on the kernel (vagrant/matrix.py KERNEL_TESTS_CI)
KERNEL_SET ?= full
# KERNELS="6.1 6.18": those of vagrant/kernels.txt only (default: all)
KERNELS ?=
test-kernels: deps venv bpf ext kernel-deps
	$(VPY) vagrant/matrix.py test -j $(KERNEL_JOBS) --set $(KERNEL_SET) --pytest-args "$(KERNEL_PYTEST_ARGS)" $(KERNELS)

lint: venv
	$(VENV)/bin/ruff check kwatch tests bench vagrant setup.py

typecheck: venv
	$(VENV)/bin/mypy

check: lint typecheck test

run: deps venv bpf ext mounts
	$(VENV)/bin/kwatch run

bench: deps venv bpf ext mounts bench-deps
	$(VPY) -m bench.run --all --write-readme

bench-quick: deps venv bpf ext mounts bench-deps
	$(VPY) -m bench.run --quick

bench-capture: deps venv bpf ext mounts bench-deps
	$(VPY) -m bench.run capture --write-readme

bench-replicate: deps venv bpf ext mounts bench-deps
	$(VPY) -m bench.run replicate --write-readme

# make install [DESTDIR=/staging] [PREFIX=/usr/local]: kwatch in a venv of its own under $(LIBDIR) (with the BPF object
# and the C decoder built here), $(PREFIX)/bin/kwatch, the systemd unit, /etc/kwatch/ with the example security
# ruleset (kwatch.toml only when absent: a config of one's own is never overwritten).
PREFIX ?= /usr/local
LIBDIR ?= /opt/kwatch
SYSCONFDIR ?= /etc
UNITDIR ?= /etc/systemd/system
install: deps bpf ext
	$(PY) -m venv $(DESTDIR)$(LIBDIR)
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q --upgrade pip
	$(DESTDIR)$(LIBDIR)/bin/python -m pip install -q .
	install -d $(DESTDIR)$(PREFIX)/bin $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSCONFDIR)/kwatch
	ln -sfn $(LIBDIR)/bin/kwatch $(DESTDIR)$(PREFIX)/bin/kwatch
	sed -e 's|^ExecStart=/usr/local/bin/kwatch |ExecStart=$(PREFIX)/bin/kwatch |' \
	  -e 's|/etc/kwatch/kwatch.toml|$(SYSCONFDIR)/kwatch/kwatch.toml|' \
	  kwatch/daemon/kwatch.service > $(DESTDIR)$(UNITDIR)/kwatch.service
	chmod 644 $(DESTDIR)$(UNITDIR)/kwatch.service
	install -m 640 kwatch/rules/security.toml $(DESTDIR)$(SYSCONFDIR)/kwatch/security.toml
	[ -e $(DESTDIR)$(SYSCONFDIR)/kwatch/kwatch.toml ] || \
	  install -m 640 kwatch/rules/security.toml $(DESTDIR)$(SYSCONFDIR)/kwatch/kwatch.toml
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi
	@echo "installed: $(PREFIX)/bin/kwatch, $(UNITDIR)/kwatch.service, $(SYSCONFDIR)/kwatch/; start with: systemctl enable --now kwatch"

clean:
	rm -rf $(BUILD) $(BPF_OBJ) $(BPF_OBJ_PR) $(BPF_VFS) $(BPF_VFS_PR) $(BPF_PROBES) $(EXT) $(EXT_FLIST) .pytest_cache .mypy_cache .ruff_cache
