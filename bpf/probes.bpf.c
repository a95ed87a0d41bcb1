// SPDX-License-Identifier: GPL-2.0
/*
 * Tiny programs `kwatch doctor` loads and attaches one at a time to learn what this kernel allows (a probe by
 * trying, never a version test). Each does nothing; the verdict is whether the kernel accepted the load and the
 * attachment. The hooks are the ones a VFS-level capture would use: vfs_unlink for fentry/fexit and kprobes,
 * path_unlink for BPF LSM.
 */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "GPL";

SEC("tp/syscalls/sys_enter_getppid")
int probe_tracepoint(void *ctx)
{
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(probe_tp_btf, struct task_struct *parent, struct task_struct *child)
{
	return 0;
}

SEC("fentry/vfs_unlink")
int BPF_PROG(probe_fentry)
{
	return 0;
}

SEC("fexit/vfs_unlink")
int BPF_PROG(probe_fexit)
{
	return 0;
}

SEC("lsm/path_unlink")
int BPF_PROG(probe_lsm, const struct path *dir, struct dentry *dentry)
{
	return 0;
}

SEC("kprobe/vfs_unlink")
int BPF_KPROBE(probe_kprobe)
{
	return 0;
}

SEC("tp/io_uring/io_uring_submit_req")
int probe_io_uring_tp(void *ctx)
{
	return 0;
}

SEC("tp/io_uring/io_uring_submit_sqe")
int probe_io_uring_tp_old(void *ctx)
{
	return 0;
}

