// SPDX-License-Identifier: GPL-2.0
/*
 * kwatch capture: syscall tracepoints -> one kw_event per successful file operation -> ring buffer.
 *
 * Why syscall tracepoints: on the kernels kwatch must run on, fentry/fexit and BPF LSM may be refused and kprobes may
 * be absent, while syscall tracepoints always attach (docs/design.md, "Why syscall tracepoints"). The price is that
 * the path must be assembled here from the dirfd/cwd and the name the process passed, instead of taken from the VFS
 * after lookup.
 *
 * Flow: sys_exit_X drops failed calls, reads the call's arguments from the thread's saved user registers (still the
 * ones the syscall was given: the kernel does not write them back), checks the op and process filters, and hands
 * the arguments to the shared exit program (kw_exit, by tail call), which resolves the paths and emits one record.
 * No entry program runs for those calls and nothing is kept from entry to exit. Entry programs remain only where
 * the exit is too late: close() and its kin are emitted at entry (the descriptor is gone at exit, and a close(2) of
 * a valid descriptor always releases it, even when it returns an error), and renames invalidate the path cache.
 *
 * Paths are resolved by walking dentry->d_parent and crossing mounts through struct mount, like d_path() does
 * (fs/d_path.c: prepend_path), with bpf_loop so that deep trees do not hit the verifier's loop limits.
 */
#include "kw_common.h"

char LICENSE[] SEC("license") = "GPL";

enum { ARGS_NAME = 1, ARGS_FD = 2, ARGS_OPEN = 3, ARGS_SYMLINK = 4 };

struct kw_args {
	__u32 op;
	__u32 kind;
	__s32 dfd1;
	__s32 dfd2;
	__u64 name1;
	__u64 name2;
	__u32 flags;
	__u32 mode;
	__s32 uid;
	__s32 gid;
	__s32 fd;
	__u32 _pad;
};

/*
 * The arguments an exit program hands to kw_exit across the tail call. Per CPU: the two run back to back on one CPU
 * with preemption off (the syscall tracepoint handlers disable it), so nothing else writes the slot in between.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kw_args);
} kw_pending SEC(".maps");

static __always_inline struct file *fd_file(struct task_struct *task, int fd)
{
	struct fdtable *fdt = KR(KP(struct task_struct, task), files, fdt);
	unsigned int max = KR(fdt, max_fds);
	if (fd < 0 || (unsigned int)fd >= max)
		return NULL;
	/*
	 * fd[fd] through a typed view, a plain load: the verifier allows no arithmetic on a typed pointer, so the slot's
	 * address is typed as a struct whose first member is one pointer (llist_node: just "next").
	 */
	__u64 slot = (__u64)KR(fdt, fd) + (__u64)fd * sizeof(void *);
	return (struct file *)KR(KP(struct llist_node, slot), next);
}

/* The directory a name is resolved against: the dirfd's file, or the cwd. */
static __always_inline __u32 walk_base(struct kw_scratch *s, struct task_struct *task, int dfd, __u32 off,
					 __u8 check_roots, __u8 *in_root, __u16 *trunc, int slot)
{
	if (dfd == AT_FDCWD) {
		struct path pwd = {};
		KR_INTO(&pwd, KP(struct task_struct, task), fs, pwd);
		return walk_path(s, pwd.dentry, pwd.mnt, off, check_roots, in_root, trunc, slot);
	}
	struct file *f = fd_file(task, dfd);
	if (!f)
		return 0;
	struct path fp = {};
	KR_INTO(&fp, KP(struct file, f), f_path);
	return walk_path(s, fp.dentry, fp.mnt, off, check_roots, in_root, trunc, slot);
}

static __always_inline __u32 walk_file(struct kw_scratch *s, struct file *f, __u32 off, __u8 check_roots,
					 __u8 *in_root, __u16 *trunc)
{
	struct path fp = {};
	KR_INTO(&fp, KP(struct file, f), f_path);
	return walk_path(s, fp.dentry, fp.mnt, off, check_roots, in_root, trunc, 0);
}

/* Copy a user string into data at off; returns its length without the NUL (0 on fault). */
static __always_inline __u32 read_name(struct kw_scratch *s, __u64 uptr, __u32 off)
{
	if (!uptr)
		return 0;
	long n = bpf_probe_read_user_str(&s->data[off & DATA_MASK], KW_SLOT_MAX, (const void *)uptr);
	if (n <= 0)
		return 0;
	return (__u32)(n - 1) & (KW_SLOT_MAX - 1);
}

static __always_inline int is_absolute(__u64 uptr)
{
	char c = 0;
	if (!uptr)
		return 0;
	bpf_probe_read_user(&c, 1, (const void *)uptr);
	return c == '/';
}

struct dotdot_ctx {
	struct kw_scratch *s;
	__u32 off;
	__u32 len;
	__u8 found;
	__u8 prev_dot; /* the last byte of the previous word was a '.' */
};

#define LOW7 0x7f7f7f7f7f7f7f7fULL
#define DOTS 0x2e2e2e2e2e2e2e2eULL
#define SLASHES 0x2f2f2f2f2f2f2f2fULL

/* The name's eight bytes at step i into *w (past the name: 0xff, never a '.' or a '/'); 0 once the name is done. */
static __always_inline int name_word(struct dotdot_ctx *x, __u32 i, __u64 *w)
{
	__u32 at = i * 8;
	if (!x->s || at >= x->len)
		return 0;
	*w = *(__u64 *)&x->s->data[(x->off + at) & DATA_MASK];
	__u32 left = x->len - at;
	if (left < 8)
		*w |= ~0ULL << (left * 8);
	return 1;
}

/* 0x80 in each byte of w that equals the byte repeated in pat (the exact zero-byte test applied to w ^ pat). */
static __always_inline __u64 bytes_equal(__u64 w, __u64 pat)
{
	__u64 t = w ^ pat;
	return ~(((t & LOW7) + LOW7) | t | LOW7);
}

/* Eight bytes per step: stops at the first ".." (within the word, or across two words). */
static long dotdot_word(__u32 i, void *c)
{
	struct dotdot_ctx *x = c;
	__u64 w;
	if (!name_word(x, i, &w))
		return 1;
	__u64 m = bytes_equal(w, DOTS);
	if ((m & (m >> 8)) || (x->prev_dot && (m & 0x80))) {
		x->found = 1;
		return 1;
	}
	x->prev_dot = m >> 63;
	return 0;
}

/* True when a name contains "..": the kernel cannot tell where it leads, so userspace must decide. */
static __always_inline int has_dotdot(struct kw_scratch *s, __u32 off, __u32 len)
{
	struct dotdot_ctx x = { .s = s, .off = off, .len = len };
	bpf_loop(KW_SLOT_MAX / 8 + 1, dotdot_word, &x, 0);
	return x.found;
}

/* Eight bytes per step, as dotdot_word: stops at the first '/'. */
static long slash_word(__u32 i, void *c)
{
	struct dotdot_ctx *x = c;
	__u64 w;
	if (!name_word(x, i, &w))
		return 1;
	if (bytes_equal(w, SLASHES)) {
		x->found = 1;
		return 1;
	}
	return 0;
}

/*
 * True when a relative name has a directory part ("a/b"): that part may be a symlink into a watched tree, which the
 * kernel resolved and a tracepoint cannot see. A name without one lives in the base directory the walk placed.
 */
static __always_inline int has_slash(struct kw_scratch *s, __u32 off, __u32 len)
{
	struct dotdot_ctx x = { .s = s, .off = off, .len = len };
	bpf_loop(KW_SLOT_MAX / 8 + 1, slash_word, &x, 0);
	return x.found;
}


struct prefix_ctx {
	struct kw_scratch *s;
	struct kw_root_path *r;
	__u32 off;
	__u32 len;
	__u8 differ;
};

static long prefix_byte(__u32 i, void *c)
{
	struct prefix_ctx *x = c;
	if (!x->s || !x->r || i >= x->len)
		return 1;
	if (x->s->data[(x->off + i) & DATA_MASK] != x->r->path[i & (KW_ROOT_PATH_MAX - 1)]) {
		x->differ = 1;
		return 1;
	}
	return 0;
}

struct roots_ctx {
	struct kw_scratch *s;
	__u32 off;
	__u32 n;
	__u8 found;
};

static long root_step(__u32 idx, void *c)
{
	struct roots_ctx *x = c;
	struct kw_root_path *r = bpf_map_lookup_elem(&kw_root_paths, &idx);
	if (!r || !r->len || !x->s)
		return 1; /* the list ends at the first empty slot */
	__u32 len = r->len;
	if (len >= KW_ROOT_PATH_MAX || len > x->n)
		return 0;
	struct prefix_ctx p = { .s = x->s, .r = r, .off = x->off, .len = len };
	bpf_loop(KW_ROOT_PATH_MAX, prefix_byte, &p, 0);
	if (p.differ)
		return 0;
	/* a whole component: "/srv/a" is under "/srv" but not under "/sr" */
	if (len == x->n || len == 1 || x->s->data[(x->off + len) & DATA_MASK] == '/') {
		x->found = 1;
		return 1;
	}
	return 0;
}

/* True when the absolute name at data[off, off+n) is a watched root or inside one. */
static __always_inline int abs_in_roots(struct kw_scratch *s, __u32 off, __u32 n)
{
	struct roots_ctx x = { .s = s, .off = off, .n = n };
	bpf_loop(KW_MAX_ROOT_PATHS, root_step, &x, 0);
	return x.found;
}

/*
 * After the base walk left a name's place open: a name with ".." could lead anywhere (userspace decides); an
 * absolute one is compared with the watched roots here, and one outside them is left to userspace too, as is a
 * relative one with a directory part: either may go through a symlinked directory into a watched tree (the kernel's
 * resolution is not visible here), which userspace finds by resolving the name's directory
 * (BpfSource._through_symlinks). Returns 1 when undecided.
 */
static __always_inline __u8 name_undecided(struct kw_scratch *s, __u32 off, __u32 n, __u8 abs, __u8 *roots)
{
	if (has_dotdot(s, off, n))
		return 1;
	if (abs) {
		if (!abs_in_roots(s, off, n))
			return 1;
		*roots |= ROOT_IN;
		return 0;
	}
	return has_slash(s, off, n);
}


/*
 * The shared exit path, one program reached by tail call from every sys_exit_X program: the verifier then checks
 * it once instead of once per syscall (that took seconds at start-up).
 */
SEC("tp")
int kw_exit(struct trace_event_raw_sys_exit *ctx)
{
	long ret = ctx->ret;
	__u32 zero = 0;
	struct kw_args *ap = bpf_map_lookup_elem(&kw_pending, &zero);
	if (!ap || !ap->op)
		return 0;
	struct kw_args a = *ap;

	struct kw_config *cfg = kw_config_get();
	if (!cfg)
		return 0;
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct kw_scratch *s = begin(task, a.op, ret);
	if (!s)
		return 0;
	struct kw_event *e = &s->ev;
	__u8 check = cfg->use_roots ? 1 : 0;
	__u8 in_root = 0;
	__u8 undecided = 0;
	__u8 abs = 0;
	__u16 trunc = 0;
	__u32 off = 0, n;

	e->flags = a.flags;
	e->mode = a.mode;
	e->owner_uid = a.uid;
	e->owner_gid = a.gid;

	if (a.kind == ARGS_OPEN) {
		struct file *f = fd_file(task, (int)ret);
		if (!f)
			return 0;
		__u32 fmode = KR(KP(struct file, f), f_mode);
		__u32 ft = file_type(f);
		if (ft != S_IFREG)
			return 0;
		if (fmode & FMODE_CREATED)
			e->op = KW_CREATE;
		else if ((a.flags & O_ACCMODE) || (a.flags & O_TRUNC))
			e->op = KW_OPEN_WRITE;
		else
			return 0; /* O_CREAT|O_RDONLY on an existing file: nothing changed */
		if (!(cfg->op_mask & (1u << e->op)))
			return 0;
		e->ftype = ft;
		n = walk_file(s, f, 0, check, &in_root, &trunc);
		e->len[0] = n;
		off = n;
	} else if (a.kind == ARGS_FD) {
		struct file *f = fd_file(task, a.fd);
		if (!f)
			return 0;
		e->ftype = file_type(f);
		n = walk_file(s, f, 0, check, &in_root, &trunc);
		e->len[0] = n;
		off = n;
	} else {
		/* name-based: slot 0 base, slot 1 name, slot 2 base2, slot 3 name2 (or symlink target) */
		if (is_absolute(a.name1)) {
			abs = 1;
			n = 0;
		} else {
			n = walk_base(s, task, a.dfd1, 0, check, &in_root, &trunc, 0);
		}
		if (in_root & ROOT_ANCESTOR)
			undecided = 1;
		e->len[0] = n;
		off = n;
		n = read_name(s, a.name1, off);
		if (check && !(in_root & ROOT_IN) && !undecided)
			undecided = name_undecided(s, off, n, abs, &in_root);
		e->len[1] = n;
		off += n;
		if (a.kind == ARGS_SYMLINK) {
			e->ftype = S_IFLNK;
			n = read_name(s, a.name2, off);
			e->len[3] = n;
			off += n;
		} else if (a.name2) {
			__u32 off2 = off;
			abs = 0;
			if (is_absolute(a.name2)) {
				abs = 1;
				n = 0;
			} else {
				n = walk_base(s, task, a.dfd2, off, check, &in_root, &trunc, 2);
			}
			if (in_root & ROOT_ANCESTOR)
				undecided = 1;
			e->len[2] = n;
			off += n;
			n = read_name(s, a.name2, off);
			if (check && !(in_root & ROOT_IN) && !undecided)
				undecided = name_undecided(s, off, n, abs, &in_root);
			e->len[3] = n;
			off += n;
			(void)off2;
		}
		if (a.op == KW_MKDIR || a.op == KW_RMDIR)
			e->ftype = S_IFDIR;
	}
	/* a cut walk never reached the top, so it cannot prove the path is outside: let userspace see it, flagged */
	if (check && !(in_root & ROOT_IN) && !undecided && !trunc)
		return 0;
	e->in_root = in_root & ROOT_IN;
	e->trunc = trunc;
	finish(s, off);
	return 0;
}

/* ---- closes: emitted at entry ---------------------------------------------------------------------------------- */
/*
 * CLOSE_WRITE is reported for every descriptor of a regular file opened for writing that goes away: close(2),
 * dup2/dup3 over it, close_range(2), and process exit (when the fd table dies with it). Without an fput hook the
 * last reference cannot be seen, and shells do dup2+close pairs, so a writer may produce more than one CLOSE_WRITE;
 * none is missed except close-on-exec at execve.
 */
static __always_inline int emit_close(struct task_struct *task, struct file *f)
{
	if (!f)
		return 0;
	if (!(KR(KP(struct file, f), f_mode) & FMODE_WRITE) || file_type(f) != S_IFREG)
		return 0;
	if (!wanted(KW_CLOSE_WRITE, task))
		return 0;
	struct kw_config *cfg = kw_config_get();
	if (!cfg)
		return 0;
	struct kw_scratch *s = begin(task, KW_CLOSE_WRITE, 0);
	if (!s)
		return 0;
	__u8 in_root = 0;
	__u16 trunc = 0;
	__u8 check = cfg->use_roots ? 1 : 0;
	__u32 n = walk_file(s, f, 0, check, &in_root, &trunc);
	if (check && !(in_root & ROOT_IN) && !trunc)
		return 0;
	s->ev.len[0] = n;
	s->ev.ftype = S_IFREG;
	s->ev.flags = KR(KP(struct file, f), f_flags);
	s->ev.in_root = in_root & ROOT_IN;
	s->ev.trunc = trunc;
	finish(s, n);
	return 0;
}

SEC("tp/syscalls/sys_enter_close")
int enter_close(struct trace_event_raw_sys_enter *ctx)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	return emit_close(task, fd_file(task, (int)ctx->args[0]));
}

static __always_inline int dup_over(int oldfd, int newfd)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	/* dup2 closes newfd only when oldfd is valid and differs */
	if (oldfd == newfd || !fd_file(task, oldfd))
		return 0;
	return emit_close(task, fd_file(task, newfd));
}

SEC("tp/syscalls/sys_enter_dup2")
int enter_dup2(struct trace_event_raw_sys_enter *ctx) { return dup_over(ctx->args[0], ctx->args[1]); }

SEC("tp/syscalls/sys_enter_dup3")
int enter_dup3(struct trace_event_raw_sys_enter *ctx) { return dup_over(ctx->args[0], ctx->args[1]); }

struct fdscan_ctx {
	struct task_struct *task;
	struct file **arr;
	__u32 first;
	__u32 last;
};

static long fdscan_step(__u32 i, void *c)
{
	struct fdscan_ctx *x = c;
	__u32 fd = x->first + i;
	if (fd > x->last)
		return 1;
	struct file *f = NULL;
	bpf_probe_read_kernel(&f, sizeof(f), &x->arr[fd]);
	if (f)
		emit_close(x->task, f);
	return 0;
}

#define FDSCAN_MAX 65536

static __always_inline void scan_fds(struct task_struct *task, __u32 first, __u32 last)
{
	struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);
	__u32 max = BPF_CORE_READ(fdt, max_fds);
	if (!max || first >= max)
		return;
	if (last >= max)
		last = max - 1;
	struct fdscan_ctx x = { .task = task, .arr = BPF_CORE_READ(fdt, fd), .first = first, .last = last };
	bpf_loop(FDSCAN_MAX, fdscan_step, &x, 0);
}

#define CLOSE_RANGE_CLOEXEC 4

SEC("tp/syscalls/sys_enter_close_range")
int enter_close_range(struct trace_event_raw_sys_enter *ctx)
{
	if (ctx->args[2] & CLOSE_RANGE_CLOEXEC)
		return 0;
	scan_fds((struct task_struct *)bpf_get_current_task(), ctx->args[0], ctx->args[1]);
	return 0;
}

/*
 * Process exit closes every descriptor when the last thread sharing the fd table leaves (exit_files); an excluded
 * process's entry goes too (forget_excluded).
 */
SEC("tp/sched/sched_process_exit")
int kw_process_exit(void *ctx)
{
	struct task_struct *task = KP(struct task_struct, bpf_get_current_task());
	forget_excluded(task);
	struct files_struct *files = KR(task, files);
	if (!files || KR(KP(struct files_struct, files), count.counter) != 1)
		return 0;
	scan_fds((struct task_struct *)task, 0, ~0u);
	return 0;
}

/*
 * The io_uring opcodes that can make, change or remove a file or a name (enum io_uring_op is UAPI: the numbers are
 * fixed). Opens count whatever their flags: the tracepoint does not carry them. The file or name is not known at
 * submission (an open's or a rename's path is resolved later, by an io-wq worker or in task work), so the marker
 * says only that something changed somewhere.
 */
static __always_inline int uring_op_changes_files(__u8 op)
{
	switch (op) {
	case 2:  /* WRITEV */
	case 5:  /* WRITE_FIXED */
	case 17: /* FALLOCATE */
	case 18: /* OPENAT */
	case 19: /* CLOSE */
	case 23: /* WRITE */
	case 28: /* OPENAT2 */
	case 30: /* SPLICE (into a file) */
	case 35: /* RENAMEAT */
	case 36: /* UNLINKAT */
	case 37: /* MKDIRAT */
	case 38: /* SYMLINKAT */
	case 39: /* LINKAT */
	case 41: /* FSETXATTR */
	case 42: /* SETXATTR */
	case 55: /* FTRUNCATE */
		return 1;
	}
	return 0;
}

static __always_inline int uring_count(__u8 opcode)
{
	if (!uring_op_changes_files(opcode))
		return 0;
	struct kw_config *cfg = kw_config_get();
	if (!cfg || excluded(cfg, (struct task_struct *)bpf_get_current_task()))
		return 0;
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&kw_uring, &zero);
	if (n)
		*n += 1;
	return 0;
}

/* Linux 6.4 and later */
SEC("tp/io_uring/io_uring_submit_req")
int kw_uring_submit(struct trace_event_raw_io_uring_submit_req *ctx)
{
	return uring_count(ctx->opcode);
}

/*
 * The same tracepoint before it was renamed (Debian 12's 6.1); its record type is not in the BTF the object is built
 * against, so only the field used is declared, and CO-RE finds it in the running kernel's BTF by name (the ___old
 * suffix is dropped in the match). The loader attaches whichever of the two the kernel has.
 */
struct trace_event_raw_io_uring_submit_sqe___old {
	struct trace_entry ent;
	u8 opcode;
} __attribute__((preserve_access_index));

SEC("tp/io_uring/io_uring_submit_sqe")
int kw_uring_submit_old(struct trace_event_raw_io_uring_submit_sqe___old *ctx)
{
	return uring_count(ctx->opcode);
}


/* ---- entry handlers ------------------------------------------------------------------------------------------- */

/*
 * The syscall's arguments at exit, from the user registers saved at syscall entry (task_pt_regs): the kernel passes
 * them to the syscall and does not write them back, so they are what the entry tracepoint saw. The per-architecture
 * register names live here and nowhere else.
 */
#if defined(__TARGET_ARCH_x86)
#define REG_ARG0(r) ((r)->di)
#define REG_ARG1(r) ((r)->si)
#define REG_ARG2(r) ((r)->dx)
#define REG_ARG3(r) ((r)->r10)
#define REG_ARG4(r) ((r)->r8)
#elif defined(__TARGET_ARCH_arm64)
#define REG_ARG0(r) ((r)->orig_x0) /* x0 holds the return value by now */
#define REG_ARG1(r) ((r)->regs[1])
#define REG_ARG2(r) ((r)->regs[2])
#define REG_ARG3(r) ((r)->regs[3])
#define REG_ARG4(r) ((r)->regs[4])
#else
#error "kwatch: syscall argument registers unknown for this architecture"
#endif

/* A typed pointer: its fields are read with plain (exception-guarded) loads. */
static __always_inline struct pt_regs *user_regs(void)
{
	return (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
}

struct {
	__uint(type, BPF_MAP_TYPE_PROG_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, int(void *));
} kw_jump SEC(".maps") = {
	.values = { [0] = (void *)&kw_exit },
};

/* Filters first (op, excluded process), then the arguments go to kw_exit through the per-CPU slot. */
static __always_inline int handoff(void *ctx, struct kw_args *a, __u32 op_bits)
{
	__u32 zero = 0;
	struct kw_config *cfg = kw_config_get();
	if (!cfg || !(cfg->op_mask & op_bits) || excluded(cfg, bpf_get_current_task_btf()))
		return 0;
	struct kw_args *slot = bpf_map_lookup_elem(&kw_pending, &zero);
	if (!slot)
		return 0;
	*slot = *a; /* written before every tail call, so nothing clears it */
	bpf_tail_call(ctx, &kw_jump, 0);
	return 0;
}

static __always_inline int open_common(void *ctx, int dfd, __u64 name, __u32 flags, __u32 mode)
{
	/* read-only opens without O_CREAT/O_TRUNC change nothing: drop them before touching any map */
	if (!(flags & O_ACCMODE) && !(flags & (O_CREAT | O_TRUNC)))
		return 0;
	struct kw_args a = { .op = KW_OPEN_WRITE, .kind = ARGS_OPEN, .dfd1 = dfd, .name1 = name, .flags = flags,
			     .mode = mode, .uid = -1, .gid = -1 };
	return handoff(ctx, &a, (1u << KW_OPEN_WRITE) | (1u << KW_CREATE));
}

static __always_inline int name_op(void *ctx, __u32 op, int dfd, __u64 name, __u32 flags, __u32 mode)
{
	struct kw_args a = { .op = op, .kind = ARGS_NAME, .dfd1 = dfd, .name1 = name, .flags = flags, .mode = mode,
			     .uid = -1, .gid = -1 };
	return handoff(ctx, &a, 1u << op);
}

static __always_inline int two_name_op(void *ctx, __u32 op, int dfd1, __u64 name1, int dfd2, __u64 name2,
				       __u32 flags)
{
	struct kw_args a = { .op = op, .kind = ARGS_NAME, .dfd1 = dfd1, .name1 = name1, .dfd2 = dfd2, .name2 = name2,
			     .flags = flags, .uid = -1, .gid = -1 };
	return handoff(ctx, &a, 1u << op);
}

static __always_inline int fd_op(void *ctx, __u32 op, int fd, __u32 mode, int uid, int gid)
{
	struct kw_args a = { .op = op, .kind = ARGS_FD, .fd = fd, .mode = mode, .uid = uid, .gid = gid };
	return handoff(ctx, &a, 1u << op);
}

static __always_inline int chown_op(void *ctx, int dfd, __u64 name, int uid, int gid, __u32 flags)
{
	struct kw_args a = { .op = KW_CHOWN, .kind = ARGS_NAME, .dfd1 = dfd, .name1 = name, .uid = uid, .gid = gid,
			     .flags = flags };
	return handoff(ctx, &a, 1u << KW_CHOWN);
}

/* A NULL name with a dirfd means "the file dfd refers to" (utimensat(2), and AT_EMPTY_PATH calls with NULL). */
static __always_inline int name_or_fd_op(void *ctx, __u32 op, int dfd, __u64 name, __u32 flags)
{
	if (!name && dfd != AT_FDCWD) {
		struct kw_args a = { .op = op, .kind = ARGS_FD, .fd = dfd, .flags = flags, .uid = -1, .gid = -1 };
		return handoff(ctx, &a, 1u << op);
	}
	return name_op(ctx, op, dfd, name, flags, 0);
}

#define ENTER(sc) SEC("tp/syscalls/sys_enter_" #sc) int enter_##sc(struct trace_event_raw_sys_enter *ctx)

/*
 * EXIT(sc) { body }: the exit program of one syscall. Failed calls are dropped before anything else; the body sees
 * the arguments as ARG(0..4) and returns through one of the *_op helpers above.
 */
#define EXIT(sc)                                                                                                   \
	static __always_inline int exit_body_##sc(void *ctx, struct pt_regs *regs);                                \
	SEC("tp/syscalls/sys_exit_" #sc) int exit_##sc(struct trace_event_raw_sys_exit *ctx)                     \
	{                                                                                                          \
		if (ctx->ret < 0)                                                                                  \
			return 0;                                                                                  \
		return exit_body_##sc(ctx, user_regs());                          \
	}                                                                                                          \
	static __always_inline int exit_body_##sc(void *ctx, struct pt_regs *regs)
#define ARG(i) ((__u64)REG_ARG##i(regs))

EXIT(open) { return open_common(ctx, AT_FDCWD, ARG(0), ARG(1), ARG(2)); }
EXIT(openat) { return open_common(ctx, ARG(0), ARG(1), ARG(2), ARG(3)); }
EXIT(openat2)
{
	/* struct open_how is still in the caller's memory: the syscall returned to nobody yet */
	__u64 how[2] = {};
	bpf_probe_read_user(how, sizeof(how), (void *)ARG(2));
	return open_common(ctx, ARG(0), ARG(1), (__u32)how[0], (__u32)how[1]);
}
EXIT(creat) { return open_common(ctx, AT_FDCWD, ARG(0), O_CREAT | O_TRUNC | 1, ARG(1)); }

EXIT(unlink) { return name_op(ctx, KW_UNLINK, AT_FDCWD, ARG(0), 0, 0); }
EXIT(unlinkat) { return name_op(ctx, (ARG(2) & AT_REMOVEDIR) ? KW_RMDIR : KW_UNLINK, ARG(0), ARG(1), ARG(2), 0); }
EXIT(rmdir) { return name_op(ctx, KW_RMDIR, AT_FDCWD, ARG(0), 0, 0); }
EXIT(mkdir) { return name_op(ctx, KW_MKDIR, AT_FDCWD, ARG(0), 0, ARG(1)); }
EXIT(mkdirat) { return name_op(ctx, KW_MKDIR, ARG(0), ARG(1), 0, ARG(2)); }

/*
 * Renames change paths: the path cache (kw_pcache) is invalidated at their entry and again at their exit, so a path
 * resolved while a rename runs is not kept. The exit bump comes before the failed-call check: a failed rename may
 * have run past the entry bump too.
 */
ENTER(rename) { rename_gen_bump(); return 0; }
ENTER(renameat) { rename_gen_bump(); return 0; }
ENTER(renameat2) { rename_gen_bump(); return 0; }

#define EXIT_RENAME(sc, body)                                                                                      \
	SEC("tp/syscalls/sys_exit_" #sc) int exit_##sc(struct trace_event_raw_sys_exit *ctx)                     \
	{                                                                                                          \
		rename_gen_bump();                                                                                 \
		if (ctx->ret < 0)                                                                                  \
			return 0;                                                                                  \
		struct pt_regs *regs = user_regs();                                                                \
		return body;                                                                                       \
	}

EXIT_RENAME(rename, two_name_op(ctx, KW_RENAME, AT_FDCWD, ARG(0), AT_FDCWD, ARG(1), 0))
EXIT_RENAME(renameat, two_name_op(ctx, KW_RENAME, ARG(0), ARG(1), ARG(2), ARG(3), 0))
EXIT_RENAME(renameat2, two_name_op(ctx, KW_RENAME, ARG(0), ARG(1), ARG(2), ARG(3), ARG(4)))

EXIT(link) { return two_name_op(ctx, KW_LINK, AT_FDCWD, ARG(0), AT_FDCWD, ARG(1), 0); }
EXIT(linkat) { return two_name_op(ctx, KW_LINK, ARG(0), ARG(1), ARG(2), ARG(3), ARG(4)); }

EXIT(symlink)
{
	struct kw_args a = { .op = KW_SYMLINK, .kind = ARGS_SYMLINK, .dfd1 = AT_FDCWD, .name1 = ARG(1),
			     .name2 = ARG(0), .uid = -1, .gid = -1 };
	return handoff(ctx, &a, 1u << KW_SYMLINK);
}
EXIT(symlinkat)
{
	struct kw_args a = { .op = KW_SYMLINK, .kind = ARGS_SYMLINK, .dfd1 = ARG(1), .name1 = ARG(2),
			     .name2 = ARG(0), .uid = -1, .gid = -1 };
	return handoff(ctx, &a, 1u << KW_SYMLINK);
}

EXIT(chmod) { return name_op(ctx, KW_CHMOD, AT_FDCWD, ARG(0), 0, ARG(1)); }
EXIT(fchmod) { return fd_op(ctx, KW_CHMOD, ARG(0), ARG(1), -1, -1); }
EXIT(fchmodat) { return name_op(ctx, KW_CHMOD, ARG(0), ARG(1), 0, ARG(2)); }
EXIT(fchmodat2) { return name_op(ctx, KW_CHMOD, ARG(0), ARG(1), ARG(3), ARG(2)); }

EXIT(chown) { return chown_op(ctx, AT_FDCWD, ARG(0), ARG(1), ARG(2), 0); }
EXIT(lchown) { return chown_op(ctx, AT_FDCWD, ARG(0), ARG(1), ARG(2), 0); }
EXIT(fchown) { return fd_op(ctx, KW_CHOWN, ARG(0), 0, ARG(1), ARG(2)); }
EXIT(fchownat) { return chown_op(ctx, ARG(0), ARG(1), ARG(2), ARG(3), ARG(4)); }

EXIT(truncate) { return name_op(ctx, KW_TRUNCATE, AT_FDCWD, ARG(0), 0, 0); }
EXIT(ftruncate) { return fd_op(ctx, KW_TRUNCATE, ARG(0), 0, -1, -1); }

EXIT(setxattr) { return name_op(ctx, KW_XATTR, AT_FDCWD, ARG(0), 0, 0); }
EXIT(lsetxattr) { return name_op(ctx, KW_XATTR, AT_FDCWD, ARG(0), 0, 0); }
EXIT(fsetxattr) { return fd_op(ctx, KW_XATTR, ARG(0), 0, -1, -1); }
EXIT(removexattr) { return name_op(ctx, KW_XATTR, AT_FDCWD, ARG(0), 0, 0); }
EXIT(lremovexattr) { return name_op(ctx, KW_XATTR, AT_FDCWD, ARG(0), 0, 0); }
EXIT(fremovexattr) { return fd_op(ctx, KW_XATTR, ARG(0), 0, -1, -1); }
/* Linux 6.13+; the loader skips programs whose tracepoint does not exist. */
EXIT(setxattrat) { return name_or_fd_op(ctx, KW_XATTR, ARG(0), ARG(1), ARG(2)); }
EXIT(removexattrat) { return name_or_fd_op(ctx, KW_XATTR, ARG(0), ARG(1), ARG(2)); }

EXIT(utimensat) { return name_or_fd_op(ctx, KW_UTIMES, ARG(0), ARG(1), ARG(3)); }
EXIT(futimesat) { return name_or_fd_op(ctx, KW_UTIMES, ARG(0), ARG(1), 0); }
EXIT(utimes) { return name_op(ctx, KW_UTIMES, AT_FDCWD, ARG(0), 0, 0); }
EXIT(utime) { return name_op(ctx, KW_UTIMES, AT_FDCWD, ARG(0), 0, 0); }
