/* SPDX-License-Identifier: GPL-2.0 */
/*
 * What both capture programs share (kwatch.bpf.c on syscall tracepoints, kwatch_vfs.bpf.c on VFS functions): the
 * maps userspace configures and reads (kwatch/capture/bpf.py finds them by name in either object), the path walk
 * with its per-CPU cache, record assembly into the ring buffer with per-CPU loss counting, and the excluded
 * process trees. Included once by each .bpf.c; not a library.
 */
#ifndef KW_COMMON_H
#define KW_COMMON_H

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "kwatch.h"
#include "kw_kread.h"

#define AT_FDCWD -100
#define AT_REMOVEDIR 0x200
#define O_ACCMODE 3
#define O_CREAT 0100
#define O_TRUNC 01000
#define FMODE_WRITE 0x2
#define FMODE_CREATED 0x100000 /* include/linux/fs.h: set by the open that created the file */
#define S_IFMT 0170000
#define S_IFREG 0100000
#define S_IFDIR 0040000
#define S_IFLNK 0120000

#define WALK_BUF 4096          /* a resolved directory/file path is at most PATH_MAX - 1 bytes */
#define WALK_MASK (WALK_BUF - 1)
#define WALK_MAX_STEPS 4096     /* components + mount crossings; PATH_MAX / 2 + mounts */
#define NAME_LEN_MAX 255
#define DATA_MASK 0x3fff        /* slot offsets are < 4 * 4096 */
#define DATA_SIZE (4 * KW_SLOT_MAX + KW_SLOT_MAX)
#define ROOT_IN 1
#define ROOT_ANCESTOR 2

struct kw_scratch {
	struct kw_event ev;
	char data[DATA_SIZE];
	char walk[WALK_BUF + NAME_LEN_MAX + 1];
	/* kw_walk's: the first mount crossed whose root is a directory inside its file system (a bind mount of a
	 * subdirectory, a root pivoted into one), 0 if none. Here, not in walk_ctx: 6.1's verifier counts the stack of
	 * bpf_loop's callbacks with the caller's, and kw_exit is within 32 bytes of the 512 allowed. */
	__u64 sub_root;
};

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20); /* resized by the loader */
} kw_events SEC(".maps");

/* Records lost because the ring buffer was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} kw_losses SEC(".maps");

/*
 * File operations submitted through io_uring by processes not excluded: the syscall tracepoints never see them, so
 * the consumer turns an increase into a rescan marker (a LOSS of unknown place: BpfSource.read), never silence.
 */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} kw_uring SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kw_config);
} kw_cfg SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct kw_inode_key);
	__type(value, __u8);
} kw_roots SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} kw_excl SEC(".maps");

static __always_inline void count_loss(void)
{
	__u32 zero = 0;
	__u64 *n = bpf_map_lookup_elem(&kw_losses, &zero);
	if (n)
		*n += 1;
}

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kw_scratch);
} kw_scratch SEC(".maps");

static __always_inline struct kw_config *kw_config_get(void)
{
	__u32 zero = 0;
	return bpf_map_lookup_elem(&kw_cfg, &zero);
}

/* ---- path walking -------------------------------------------------------------------------------------------- */

/* Kernel pointers are kept as plain numbers here and read through KP()/KR() (kw_kread.h). */
struct walk_ctx {
	__u64 dentry;
	__u64 mnt;
	__u64 mnt_root;
	struct kw_scratch *s;
	__u32 pos;
	__u8 trunc;
	__u8 done;
	__u8 check_roots;
	struct kw_config *cfg;
	__u8 in_root;
	__u8 base_is_ancestor;
};

static __always_inline struct mount *real_mount(struct vfsmount *v)
{
	return (struct mount *)((char *)v - bpf_core_field_offset(struct mount, mnt));
}


/* The mount namespace a vfsmount belongs to (its inode number); 0 for a detached or internal mount. */
static __always_inline __u32 mount_ns(__u64 vfsmnt)
{
	struct mount *m = KP(struct mount, (__u64)real_mount((struct vfsmount *)vfsmnt));
	return KR(m, mnt_ns, ns.inum);
}

static __always_inline int is_root_ino(struct kw_config *cfg, __u64 ino)
{
	if (!cfg)
		return 0;
	__u32 n = cfg->n_root_inos;
	for (int k = 0; k < KW_MAX_ROOT_PATHS; k++) {
		if (k >= n)
			break;
		if (cfg->root_ino[k] == ino)
			return 1;
	}
	return 0;
}

static long walk_step(__u32 i, void *c)
{
	struct walk_ctx *w = c;
	struct kw_scratch *s = w->s;

	if (!s || !w->dentry) {
		w->done = 1;
		return 1;
	}
	struct dentry *d = KP(struct dentry, w->dentry);
	if (w->check_roots && !w->in_root && w->cfg) {
		struct kw_inode_key key = {};
		key.ino = KR(d, d_inode, i_ino);
		/* the first directory may be above a root (ancestors are only in kw_roots); the others are looked up
		 * only when their inode number is a root's */
		__u8 maybe = i == 0 || is_root_ino(w->cfg, key.ino);
		__u8 *v = NULL;
		if (maybe) {
			key.dev = KR(d, d_sb, s_dev);
			v = bpf_map_lookup_elem(&kw_roots, &key);
		}
		if (v && *v == KW_ROOT_WATCHED)
			w->in_root = 1;
		else if (v && i == 0)
			w->base_is_ancestor = 1; /* a name under this directory may lead into a watched tree */
	}
	__u64 parent = (__u64)KR(d, d_parent);
	if (w->dentry == w->mnt_root || w->dentry == parent) {
		if (w->dentry != parent && !s->sub_root)
			s->sub_root = w->dentry;
		struct mount *m = KP(struct mount, w->mnt);
		__u64 mp = (__u64)KR(m, mnt_parent);
		if (!mp || w->mnt == mp) {
			w->done = 1;
			return 1;
		}
		w->dentry = (__u64)KR(m, mnt_mountpoint);
		w->mnt = mp;
		w->mnt_root = (__u64)KR(KP(struct mount, mp), mnt.mnt_root);
		return 0;
	}
	__u32 len = KR(d, d_name.len);
	const unsigned char *name = KR(d, d_name.name);
	if (len > NAME_LEN_MAX)
		len = NAME_LEN_MAX;
	/* keep pos >= 1 so a whole path is at most WALK_BUF - 1 bytes */
	if (w->pos < len + 2) {
		w->trunc = 1;
		w->done = 1;
		return 1;
	}
	w->pos -= len;
	bpf_probe_read_kernel(&s->walk[w->pos & WALK_MASK], len & NAME_LEN_MAX, name);
	w->pos -= 1;
	s->walk[w->pos & WALK_MASK] = '/';
	w->dentry = parent;
	return 0;
}

/*
 * Whether a watched directory is above dentry in its file system (d_parent up to the file system's root, no names
 * kept). A path walk follows mounts, so it does not pass the directories above a mount's root: a file written through
 * a bind mount of a watched tree's subdirectory, or by a process whose root was pivoted into one (a container's
 * root file system or volume), would look outside every watched tree and be dropped here in silence.
 */
static long fs_up_step(__u32 i, void *c)
{
	struct walk_ctx *w = c; /* the walk's own context, its walk done: w->dentry is the cursor, w->in_root the answer */
	if (!w->dentry)
		return 1;
	struct dentry *d = KP(struct dentry, w->dentry);
	struct kw_inode_key key = {};
	key.ino = KR(d, d_inode, i_ino);
	if (is_root_ino(w->cfg, key.ino)) {
		key.dev = KR(d, d_sb, s_dev);
		__u8 *v = bpf_map_lookup_elem(&kw_roots, &key);
		if (v && *v == KW_ROOT_WATCHED) {
			w->in_root = 1;
			return 1;
		}
	}
	__u64 parent = (__u64)KR(d, d_parent);
	if (parent == w->dentry)
		return 1;
	w->dentry = parent;
	return 0;
}

#define WALK_LEN_MASK 0xffff
#define WALK_ROOTS_SHIFT 16
#define WALK_TRUNC 0x40000

/*
 * Path cache: the paths this CPU resolved last, so that the calls that follow an open on the same file (fchown,
 * fchmod, futimens, close: tar makes five calls per file) copy a path instead of walking it, and a file created in a
 * directory this CPU resolved a file of just now is that directory's path, '/', and its own name (tar creates its
 * files one directory at a time). Two kinds of entries:
 *   exact  a dentry and the walk's whole result for it;
 *   dir    the parent directory of a file that was walked (its ROOT_IN bit only: it serves its files, not names).
 * An entry holds while the dentry still has the same parent, name and inode (a freed dentry's memory reused for
 * another file fails that), the rename generation is unchanged (kw_gen: bumped at the entry and the exit of every
 * rename, so a path resolved while a rename runs is not kept) and so is the configuration (cfg_gen, roots). Those
 * checks are about the dentry, not about who asks, so the cache is per CPU (a lookup the verifier inlines, where
 * task storage cost a helper call); one program runs on a CPU at a time (the tracepoint handlers run with
 * preemption off), so an entry is never seen half-written. Mounts moved under a running kwatch are not noticed
 * (mount(2) is not traced).
 */
#define PCACHE_PATH 256
#define PCACHE_EXACT 2
#define PCACHE_DIRS 2
struct kw_pcache_ent {
	__u64 dentry;
	__u64 mnt;
	__u64 parent;
	__u64 hash_len;
	__u64 ino;
	__u64 gen;
	__u32 cfg_gen;
	__u32 res;   /* kw_walk's result for this path */
	__u32 check; /* the check_roots it was resolved with */
	__u32 _pad;
	char path[PCACHE_PATH];
};

struct kw_pcache {
	struct kw_pcache_ent e[PCACHE_EXACT];
	struct kw_pcache_ent d[PCACHE_DIRS];
	__u32 next_e;
	__u32 next_d;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kw_pcache);
} kw_pcache SEC(".maps");

__u64 kw_gen = 0;

static __always_inline void rename_gen_bump(void)
{
	__sync_fetch_and_add(&kw_gen, 1);
}

struct pcache_key {
	__u64 dentry, mnt, parent, hash_len, ino, gen;
	__u32 cfg_gen, check;
};

static __always_inline int pcache_match(struct kw_pcache_ent *e, struct pcache_key *k)
{
	return e->dentry == k->dentry && e->mnt == k->mnt && e->parent == k->parent && e->hash_len == k->hash_len &&
	       e->ino == k->ino && e->gen == k->gen && e->cfg_gen == k->cfg_gen && e->check == k->check;
}

static __always_inline void pcache_key_of(struct pcache_key *k, __u64 dentry, __u64 mnt, struct kw_config *cfg,
					  __u32 check_roots)
{
	struct dentry *d = KP(struct dentry, dentry);
	k->dentry = dentry;
	k->mnt = mnt;
	k->parent = (__u64)KR(d, d_parent);
	k->hash_len = KR(d, d_name.hash_len);
	k->ino = KR(d, d_inode, i_ino);
	k->gen = kw_gen;
	k->cfg_gen = cfg ? cfg->cfg_gen : 0;
	k->check = check_roots ? 1 : 0;
}

static __always_inline void pcache_put(struct kw_pcache_ent *e, struct pcache_key *k, __u32 res, const char *path,
				       __u32 len)
{
	e->dentry = k->dentry;
	e->mnt = k->mnt;
	e->parent = k->parent;
	e->hash_len = k->hash_len;
	e->ino = k->ino;
	e->gen = k->gen;
	e->cfg_gen = k->cfg_gen;
	e->check = k->check;
	e->res = res;
	bpf_probe_read_kernel(e->path, len & (PCACHE_PATH - 1), path);
}

/*
 * Resolve (dentry, vfsmount) to an absolute path and copy it into s->data at off. A global function: the verifier
 * checks it once per program instead of once per call site (four in kw_exit), which keeps start-up fast.
 * Returns the length, ROOT_IN / ROOT_ANCESTOR << WALK_ROOTS_SHIFT (a watched directory is on the way up, or the
 * object itself is a directory above a watched tree), and WALK_TRUNC when the walk was cut.
 */
__noinline __u32 kw_walk(struct kw_scratch *s, __u64 dentry, __u64 vfsmnt, __u32 off, __u32 check_roots)
{
	if (!s)
		return WALK_TRUNC;
	struct kw_config *cfg = kw_config_get();
	struct dentry *d = KP(struct dentry, dentry);
	struct pcache_key k = {};
	pcache_key_of(&k, dentry, vfsmnt, cfg, check_roots);
	__u32 zero = 0;
	struct kw_pcache *pc = bpf_map_lookup_elem(&kw_pcache, &zero);
	struct vfsmount *mnt = (struct vfsmount *)vfsmnt;
	__u64 mnt_root = (__u64)KR(KP(struct vfsmount, mnt), mnt_root);
	/* a file reached through its directory: not a directory, not a mount's root (file bind mounts), not a root */
	__u8 child = dentry != mnt_root && (KR(d, d_inode, i_mode) & S_IFMT) != S_IFDIR && !is_root_ino(cfg, k.ino);
	__u32 name_len = KR(d, d_name.len);
	struct pcache_key pk = {}; /* a child's directory: its key serves the lookup and, on a miss, the insert */
	if (pc) {
		for (int i = 0; i < PCACHE_EXACT; i++) {
			struct kw_pcache_ent *e = &pc->e[i];
			if (pcache_match(e, &k)) {
				__u32 n = e->res & WALK_MASK;
				if (n >= PCACHE_PATH)
					break;
				bpf_probe_read_kernel(&s->data[off & DATA_MASK], n & (PCACHE_PATH - 1), e->path);
				return e->res;
			}
		}
		if (child) {
			pcache_key_of(&pk, k.parent, vfsmnt, cfg, check_roots);
			for (int i = 0; i < PCACHE_DIRS; i++) {
				struct kw_pcache_ent *e = &pc->d[i];
				if (!pcache_match(e, &pk))
					continue;
				__u32 n = e->res & WALK_MASK;
				if (n >= PCACHE_PATH || name_len > NAME_LEN_MAX)
					break;
				barrier_var(name_len); /* keep the mask below: the verifier needs it, the compiler drops it */
				bpf_probe_read_kernel(&s->data[off & DATA_MASK], n & (PCACHE_PATH - 1), e->path);
				if (n != 1) /* the directory "/" already ends in one */
					s->data[(off + n++) & DATA_MASK] = '/';
				bpf_probe_read_kernel(&s->data[(off + n) & DATA_MASK], name_len & NAME_LEN_MAX,
						      KR(d, d_name.name));
				return (e->res & ~WALK_MASK) | (n + name_len);
			}
		}
	}
	struct walk_ctx w = {};
	w.dentry = dentry;
	w.mnt = (__u64)real_mount(mnt);
	w.mnt_root = mnt_root;
	w.s = s;
	w.pos = WALK_BUF;
	w.check_roots = check_roots ? 1 : 0;
	w.cfg = cfg;
	s->sub_root = 0;
	bpf_loop(WALK_MAX_STEPS, walk_step, &w, 0);
	if (w.check_roots && !w.in_root && s->sub_root && cfg) {
		/* delivered with the path as the walk named it (another namespace's, or a mount's elsewhere here):
		 * userspace keeps it only where that path names the same file from kwatch's namespace, else a marker */
		struct dentry *top = KP(struct dentry, s->sub_root);
		w.dentry = (__u64)KR(top, d_parent);
		bpf_loop(WALK_MAX_STEPS, fs_up_step, &w, 0);
	}
	__u32 res = 0;
	if (!w.done || w.trunc)
		res |= WALK_TRUNC;
	if (w.in_root)
		res |= ROOT_IN << WALK_ROOTS_SHIFT;
	if (w.base_is_ancestor)
		res |= ROOT_ANCESTOR << WALK_ROOTS_SHIFT;
	if (w.pos >= WALK_BUF) { /* the root itself */
		w.pos = WALK_BUF - 1;
		s->walk[w.pos & WALK_MASK] = '/';
	}
	__u32 len = (WALK_BUF - w.pos) & WALK_MASK;
	bpf_probe_read_kernel(&s->data[off & DATA_MASK], len, &s->walk[w.pos & WALK_MASK]);
	res |= len;
	if (!pc || (res & WALK_TRUNC) || len >= PCACHE_PATH || k.gen != kw_gen)
		return res;
	struct kw_pcache_ent *e = &pc->e[pc->next_e & (PCACHE_EXACT - 1)];
	pc->next_e += 1;
	pcache_put(e, &k, res, &s->walk[w.pos & WALK_MASK], len);
	if (child && len > name_len + 1) {
		/* the directory's path is this one without "/name" ("/" itself for a file at the top) */
		__u32 plen = len - name_len - 1;
		e = &pc->d[pc->next_d & (PCACHE_DIRS - 1)];
		pc->next_d += 1;
		pcache_put(e, &pk, (res & (ROOT_IN << WALK_ROOTS_SHIFT)) | (plen ? plen : 1),
			   &s->walk[w.pos & WALK_MASK], plen ? plen : 1);
	}
	return res;
}

static __always_inline __u32 walk_path(struct kw_scratch *s, struct dentry *dentry, struct vfsmount *vfsmnt,
					 __u32 off, __u8 check_roots, __u8 *roots, __u16 *trunc, int slot)
{
	__u32 r = kw_walk(s, (__u64)dentry, (__u64)vfsmnt, off, check_roots);
	*roots |= (r >> WALK_ROOTS_SHIFT) & (ROOT_IN | ROOT_ANCESTOR);
	if (r & WALK_TRUNC)
		*trunc |= 1 << slot;
	return r & WALK_MASK;
}

/*
 * Watched roots as strings, for names a process passed as absolute paths: no directory walk happens for those, so
 * the kernel compares the name with each root (lexically, as userspace does; names with ".." are left undecided).
 */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, KW_MAX_ROOT_PATHS);
	__type(key, __u32);
	__type(value, struct kw_root_path);
} kw_root_paths SEC(".maps");

/* ---- record assembly ------------------------------------------------------------------------------------------ */

static __always_inline struct kw_scratch *begin(struct task_struct *task, __u32 op, long ret)
{
	__u32 zero = 0;
	struct kw_scratch *s = bpf_map_lookup_elem(&kw_scratch, &zero);
	if (!s)
		return NULL;
	/*
	 * The process fields by plain loads from the task, where the bpf_get_current_{pid_tgid,uid_gid,cgroup_id}()
	 * helpers read the same fields behind three calls (about 0.1 us per record here). uid/gid are the real ids in
	 * the initial namespace, the cgroup is the default hierarchy's (kn->id is what bpf_get_current_cgroup_id()
	 * returns and what /sys/fs/cgroup's inode numbers show).
	 */
	const struct task_struct *t = KP(struct task_struct, task);
	const struct cred *cred = KR(t, cred);
	struct kw_event *e = &s->ev;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = KR(t, cgroups, dfl_cgrp, kn, id);
	e->pid = KR(t, tgid);
	e->tid = KR(t, pid);
	e->ppid = KR(t, real_parent, tgid);
	e->uid = KR(cred, uid.val);
	e->gid = KR(cred, gid.val);
	e->ret = ret;
	e->op = op;
	e->flags = 0;
	e->mode = 0;
	e->ftype = 0;
	e->owner_uid = -1;
	e->owner_gid = -1;
	e->len[0] = e->len[1] = e->len[2] = e->len[3] = 0;
	e->trunc = 0;
	e->in_root = 0;
	/* names are resolved from the process's root and cwd, which are in its mount namespace (0 once the process
	 * has dropped its namespaces at exit: the VFS program puts the file's mount's namespace over it) */
	e->mntns = KR(t, nsproxy, mnt_ns, ns.inum);
	/* two plain loads where bpf_get_current_comm() is a helper call and a string copy (the decoders stop at NUL) */
#ifdef KW_PROBE_READ
	bpf_probe_read_kernel(e->comm, sizeof(e->comm), &t->comm);
#else
	*(__u64 *)&e->comm[0] = *(const __u64 *)&t->comm[0];
	*(__u64 *)&e->comm[8] = *(const __u64 *)&t->comm[8];
#endif
	return s;
}

/* When the last wake-up of the consumer was forced because the buffer was empty (see kw_config.wake_us). */
__u64 kw_last_wake = 0;

/* now: the record's own timestamp, so a record reads the clock once */
static __always_inline __u64 wake_flags(__u64 now)
{
	struct kw_config *cfg = kw_config_get();
	if (!cfg)
		return 0;
	__u64 avail = bpf_ringbuf_query(&kw_events, BPF_RB_AVAIL_DATA);
	if (avail >= cfg->wake_bytes)
		return BPF_RB_FORCE_WAKEUP;
	if (avail)
		return BPF_RB_NO_WAKEUP; /* the consumer was woken for, or is polling for, what is already there */
	if (now - kw_last_wake < (__u64)cfg->wake_us * 1000)
		return BPF_RB_NO_WAKEUP; /* it saw data less than wake_us ago, so it is polling */
	kw_last_wake = now;
	return BPF_RB_FORCE_WAKEUP;
}

static __always_inline void finish(struct kw_scratch *s, __u32 total)
{
	__u64 size = sizeof(struct kw_event) + (total & DATA_MASK);
	/* a full ring is the only failure left (a torn consumer position once made it look full: see ringbuf.py) */
	if (!bpf_ringbuf_output(&kw_events, &s->ev, size, wake_flags(s->ev.ts_ns)))
		return;
	count_loss();
}

/*
 * kw_excl holds every process whose events are not reported: the ones userspace registered (with the descendants
 * they had then) and every process forked from one of them since (kw_fork below). One lookup per syscall, where
 * walking up the parents took one per generation; and a daemonized grandchild stays excluded after reparenting.
 *
 * Each CPU remembers its last answer (a run of calls mostly comes from one process), valid while neither the table
 * nor the configuration changed since: the kernel bumps kw_excl_gen after each change it makes to the table (fork,
 * exit), userspace writes the configuration (cfg_gen) after each change it makes. The generation is read before the
 * table, so an answer cached across a change is never reused.
 */
__u64 kw_excl_gen = 0;

struct kw_excl_memo {
	__u64 gen;
	__u32 cfg_gen;
	__u32 tgid;
	__u32 excluded;
	__u32 valid;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct kw_excl_memo);
} kw_excl_memo SEC(".maps");

static __always_inline int excluded(struct kw_config *cfg, struct task_struct *task)
{
	__u32 tgid = KR(KP(struct task_struct, task), tgid);
	if (tgid == cfg->self_tgid)
		return 1;
	if (!cfg->use_excl)
		return 0;
	__u64 gen = kw_excl_gen;
	__u32 zero = 0;
	struct kw_excl_memo *m = bpf_map_lookup_elem(&kw_excl_memo, &zero);
	if (m && m->valid && m->tgid == tgid && m->gen == gen && m->cfg_gen == cfg->cfg_gen)
		return m->excluded;
	int ex = bpf_map_lookup_elem(&kw_excl, &tgid) != NULL;
	if (m) {
		m->gen = gen;
		m->cfg_gen = cfg->cfg_gen;
		m->tgid = tgid;
		m->excluded = ex;
		m->valid = 1;
	}
	return ex;
}

/* The last thread of an excluded process takes its kw_excl entry along, so a recycled pid starts out reported
 * (both programs' sched_process_exit handlers). */
static __always_inline void forget_excluded(struct task_struct *task)
{
	if (!KR(KP(struct task_struct, task), signal, live.counter)) {
		__u32 tgid = KR(KP(struct task_struct, task), tgid);
		if (!bpf_map_delete_elem(&kw_excl, &tgid))
			__sync_fetch_and_add(&kw_excl_gen, 1);
	}
}

static __always_inline int wanted(__u32 op, struct task_struct *task)
{
	struct kw_config *cfg = kw_config_get();
	if (!cfg || !(cfg->op_mask & (1u << op)))
		return 0;
	return !excluded(cfg, task);
}


static __always_inline __u32 file_type(struct file *f)
{
	return KR(KP(struct file, f), f_inode, i_mode) & S_IFMT;
}

/* A new process (not a thread) of an excluded one is excluded too: actions' process trees never feed back. */
SEC("tp_btf/sched_process_fork")
int BPF_PROG(kw_fork, struct task_struct *parent, struct task_struct *child)
{
	__u32 ptgid = parent->tgid;
	__u32 ctgid = child->tgid;
	if (ctgid == ptgid || !bpf_map_lookup_elem(&kw_excl, &ptgid))
		return 0;
	__u8 one = 1;
	/* the table holds 16384 processes, far above the action runner's cap; past that, events are reported */
	bpf_map_update_elem(&kw_excl, &ctgid, &one, BPF_ANY);
	__sync_fetch_and_add(&kw_excl_gen, 1); /* after the table: see excluded() */
	return 0;
}

#endif /* KW_COMMON_H */
