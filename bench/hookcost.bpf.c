// SPDX-License-Identifier: GPL-2.0
/*
 * Empty programs on the three kinds of syscall hook this kernel lets BPF use, for bench/hookcost.py: what one call
 * of a program costs before it does anything, and what the least possible record adds. The suite attaches one at a
 * time.
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

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 << 20); /* never drained: holds every record of a hookloop run */
} hook_ring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} hook_lost SEC(".maps");

struct min_record {
	__u64 ts;
	__u32 pid;
	__u32 op;
};

/* the exit tracepoint plus the least any record needs: a clock read and a 16-byte ring record, nobody woken */
SEC("tp/syscalls/sys_exit_fchmod")
int hook_tp_record(void *ctx)
{
	struct min_record *r = bpf_ringbuf_reserve(&hook_ring, sizeof(*r), 0);
	if (!r) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&hook_lost, &zero);
		if (lost)
			__sync_fetch_and_add(lost, 1);
		return 0;
	}
	r->ts = bpf_ktime_get_ns();
	r->pid = bpf_get_current_pid_tgid() >> 32;
	r->op = 1;
	bpf_ringbuf_submit(r, BPF_RB_NO_WAKEUP);
	return 0;
}
