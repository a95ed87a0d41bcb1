// SPDX-License-Identifier: GPL-2.0
/*
 * The executable path kept per process in the kernel, for bench/execost.py: what it would cost kwatch to put the exe
 * into each record from the kernel instead of resolving /proc/PID/exe in userspace (kwatch/context.py).
 *
 *   exe_exec    sched_process_exec: walks the new executable's dentry chain to a path with kwatch's own walk
 *               (kw_walk, bpf/kw_common.h) and stores it under the process's tgid;
 *   exe_fork    sched_process_fork: a new process (not a thread) inherits its parent's entry (a forked server worker
 *               that never execs has its parent's exe);
 *   exe_exit    sched_process_exit: the last thread of a process deletes its entry;
 *   rec_plain   sys_exit_fchmod: a 24-byte ring record without the exe;
 *   rec_exe     sys_exit_fchmod: the same record with the process's exe looked up and copied after it.
 *
 * Each program times itself (bpf_ktime_get_ns around its work, into exe_stats): on a loaded machine the wall time of
 * the loops varies far more between runs than these programs cost. The suite attaches a set of them at a time. The ring is never drained (it holds every record of a hookloop run).
 */
#include "kw_common.h"

char LICENSE[] SEC("license") = "GPL";

#define EXE_MAX 256 /* like the path cache's entries: an exe of 256 bytes or more would be cut (and flagged) */
#define EXE_OFF 8   /* the walk writes the path after an 8-byte header in the scratch: len, trunc */

struct exe_val {
	__u16 len;
	__u8 trunc;
	__u8 _pad[5];
	char path[EXE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 32768); /* pid_max's default; preallocated: about 9 MiB */
	__type(key, __u32);
	__type(value, struct exe_val);
} exe_by_tgid SEC(".maps");

/* counters read by the suite: see EXE_STAT_* in bench/execost.py */
#define ST_EXECS 0
#define ST_EXEC_NS 1
#define ST_MISSES 2
#define ST_LOST 3
#define ST_TRUNC 4
#define ST_PLAIN_NS 5 /* rec_plain's own time (self-timed like exe_exec), and its runs */
#define ST_PLAIN_N 6
#define ST_EXE_NS 7
#define ST_EXE_N 8
#define ST_FORK_NS 9
#define ST_FORK_N 10
#define ST_EXIT_NS 11
#define ST_EXIT_N 12
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 13);
	__type(key, __u32);
	__type(value, __u64);
} exe_stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 << 20);
} exe_ring SEC(".maps");

struct exe_record {
	__u64 ts;
	__u32 pid;
	__u32 op;
	__u16 exe_len;
	__u8 _pad[6];
	char exe[EXE_MAX];
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct exe_record);
} exe_rec_buf SEC(".maps");

static __always_inline void stat_add(__u32 k, __u64 v)
{
	__u64 *p = bpf_map_lookup_elem(&exe_stats, &k);
	if (p)
		__sync_fetch_and_add(p, v);
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(exe_exec, struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 t0 = bpf_ktime_get_ns();
	__u32 zero = 0;
	struct kw_scratch *s = bpf_map_lookup_elem(&kw_scratch, &zero);
	if (!s)
		return 0;
	/* a full walk every time: the per-CPU path cache would otherwise serve the one binary the loop execs, where a
	 * real capture's file records keep evicting it */
	rename_gen_bump();
	struct path fp = {};
	KR_INTO(&fp, KP(struct file, (__u64)bprm->file), f_path); /* copied: kw_walk takes the pointers as numbers */
	__u32 r = kw_walk(s, (__u64)fp.dentry, (__u64)fp.mnt, EXE_OFF, 0);
	__u32 len = r & WALK_MASK;
	struct exe_val *v = (struct exe_val *)s->data;
	v->trunc = (r & WALK_TRUNC) || len > EXE_MAX - 1;
	v->len = len > EXE_MAX - 1 ? EXE_MAX - 1 : len;
	__u32 tgid = p->tgid;
	bpf_map_update_elem(&exe_by_tgid, &tgid, v, BPF_ANY);
	if (v->trunc)
		stat_add(ST_TRUNC, 1);
	stat_add(ST_EXECS, 1);
	stat_add(ST_EXEC_NS, bpf_ktime_get_ns() - t0);
	return 0;
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(exe_fork, struct task_struct *parent, struct task_struct *child)
{
	__u64 t0 = bpf_ktime_get_ns();
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	if (ctgid == ptgid)
		return 0;
	struct exe_val *v = bpf_map_lookup_elem(&exe_by_tgid, &ptgid);
	if (v)
		bpf_map_update_elem(&exe_by_tgid, &ctgid, v, BPF_ANY);
	stat_add(ST_FORK_NS, bpf_ktime_get_ns() - t0);
	stat_add(ST_FORK_N, 1);
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(exe_exit, struct task_struct *p)
{
	__u64 t0 = bpf_ktime_get_ns();
	if (p->signal->live.counter)
		return 0; /* other threads of the process are still running */
	__u32 tgid = p->tgid;
	bpf_map_delete_elem(&exe_by_tgid, &tgid);
	stat_add(ST_EXIT_NS, bpf_ktime_get_ns() - t0);
	stat_add(ST_EXIT_N, 1);
	return 0;
}

static __always_inline struct exe_record *rec_begin(void)
{
	__u32 zero = 0;
	struct exe_record *r = bpf_map_lookup_elem(&exe_rec_buf, &zero);
	if (!r)
		return NULL;
	r->ts = bpf_ktime_get_ns();
	r->pid = bpf_get_current_pid_tgid() >> 32;
	r->op = 1;
	r->exe_len = 0;
	return r;
}

static __always_inline void rec_finish(struct exe_record *r, __u32 size)
{
	if (bpf_ringbuf_output(&exe_ring, r, size, BPF_RB_NO_WAKEUP))
		stat_add(ST_LOST, 1);
}

SEC("tp/syscalls/sys_exit_fchmod")
int rec_plain(void *ctx)
{
	__u64 t0 = bpf_ktime_get_ns();
	struct exe_record *r = rec_begin();
	if (r)
		rec_finish(r, offsetof(struct exe_record, exe));
	stat_add(ST_PLAIN_NS, bpf_ktime_get_ns() - t0);
	stat_add(ST_PLAIN_N, 1);
	return 0;
}

SEC("tp/syscalls/sys_exit_fchmod")
int rec_exe(void *ctx)
{
	__u64 t0 = bpf_ktime_get_ns();
	struct exe_record *r = rec_begin();
	if (!r)
		return 0;
	__u32 tgid = r->pid;
	struct exe_val *v = bpf_map_lookup_elem(&exe_by_tgid, &tgid);
	__u32 n = 0;
	if (v) {
		n = v->len & (EXE_MAX - 1);
		bpf_probe_read_kernel(r->exe, n, v->path);
		r->exe_len = n;
	} else {
		/* a process that was running before the programs were attached (the machine's others) */
		stat_add(ST_MISSES, 1);
	}
	rec_finish(r, offsetof(struct exe_record, exe) + n);
	stat_add(ST_EXE_NS, bpf_ktime_get_ns() - t0);
	stat_add(ST_EXE_N, 1);
	return 0;
}
