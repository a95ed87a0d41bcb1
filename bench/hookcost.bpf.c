// SPDX-License-Identifier: GPL-2.0
/*
 * Empty programs on the three kinds of syscall hook this kernel lets BPF use, for bench/hookcost.py: what one call
 * of a program costs before it does anything. The suite attaches one at a time.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "GPL";

/* the kind kwatch uses: one syscall's exit tracepoint (perf-event based) */
SEC("tp/syscalls/sys_exit_fchmod")
int hook_tp(void *ctx) { return 0; }

/* the raw tracepoint every syscall's exit goes through: a dispatcher would sit here */
SEC("raw_tp/sys_exit")
int hook_raw(void *ctx) { return 0; }

/* the same raw tracepoint with typed (BTF) arguments */
SEC("tp_btf/sys_exit")
int hook_btf(void *ctx) { return 0; }
