// SPDX-License-Identifier: GPL-2.0
/*
 * kwatch capture on VFS functions: fentry/fexit -> one kw_event per successful file operation -> ring buffer, in the
 * record format of kwatch.h, so the consumer and decoder are the ones of the tracepoint program (kwatch.bpf.c).
 * kwatch/capture/bpf.py loads this object where the kernel allows fentry/fexit and falls back to kwatch.bpf.c where
 * it refuses them (docs/capture.md, "The VFS hooks").
 *
 * Why these hooks:
 * - The result of an operation: fexit on the vfs_* function that performs it (vfs_unlink, vfs_rmdir, vfs_mkdir,
 *   vfs_symlink, vfs_link, vfs_rename, vfs_open, vfs_utimes, vfs_truncate, do_truncate, notify_change,
 *   vfs_setxattr, vfs_removexattr). The syscalls and io_uring's workers both end there, so io_uring's file
 *   operations are seen like any other, from the worker thread of the submitting process.
 * - The mount: vfs_* functions take dentries, and a dentry alone does not say through which mount (a bind mount, a
 *   mount namespace) the process reached it. Right before the vfs_* call, with the parent directory locked, the
 *   namei code calls the LSM path hooks with the parent's struct path (security_path_unlink, _rmdir, _mkdir,
 *   _symlink, _link, _rename, _chmod, _chown). fentry on those functions (not BPF LSM programs: those need "bpf" in
 *   the active LSM list, which Ubuntu's kernels lack by default) stores the path in the thread's task storage; the
 *   fexit that follows reports it when its dentry is the one stored. Callers that skip the LSM path hooks (nfsd,
 *   overlayfs on its upper layer) are not reported. Security tools hook the same pairs (Red Canary's sensor stores
 *   security_path_* arguments for the syscall's exit; Datadog's takes the mount from mnt_want_write).
 * - xattrs have no LSM path hook: the mount is the one the thread last asked write access to (mnt_want_write,
 *   mnt_want_write_file, which every xattr change calls first); a dentry of another superblock is not reported.
 * - CLOSE_WRITE: fentry on __fput, which runs once per struct file, when its last reference goes (after close(2),
 *   dup2 over it, exit, or io_uring's close): once per file, not once per descriptor.
 *
 * Nothing is read from user memory: names are the dentries' own (d_name), a symlink's target is the kernel's copy
 * (struct filename), and paths come from the dentries the kernel resolved, so names through symlinked directories,
 * ".." after a symlink and strings rewritten by another thread are all what the kernel used.
 *
 * Paths go through the shared walk (kw_common.h). fentry programs run with migration disabled but, on a kernel
 * with full preemption (preempt=full), not with preemption disabled: two programs on one CPU could then interleave
 * on the per-CPU scratch and path cache. Debian's and Ubuntu's kernels default to voluntary preemption, where a BPF
 * program is never preempted.
 */
#include "kw_common.h"

char LICENSE[] SEC("license") = "GPL";

/* include/linux/fs.h: struct iattr's ia_valid */
#define ATTR_MODE (1 << 0)
#define ATTR_UID (1 << 1)
#define ATTR_GID (1 << 2)
#define ATTR_OPEN (1 << 15) /* the truncation of an O_TRUNC open: an OPEN_WRITE, not a TRUNCATE */
#define S_IALLUGO 07777

/*
 * What an LSM path hook saw, kept for the vfs_* call that follows in the same thread. A rename's names are copied
 * at the hook: after the rename, the old dentry carries the new name.
 */
struct kw_vpend {
	__u32 op;
	__u32 mode;
	__u32 flags;
	__u32 _pad;
	__u64 dir;      /* parent directory of the first name: dentry and vfsmount */
	__u64 dir_mnt;
	__u64 dentry;   /* the entry the operation acts on (for link: the existing file) */
	__u64 dir2;     /* rename and link: the destination's parent and entry */
	__u64 dir2_mnt;
	__u64 dentry2;
	__u64 wmnt;     /* the mount the thread last asked write access to (xattrs) */
	char name1[NAME_LEN_MAX + 1];
	char name2[NAME_LEN_MAX + 1];
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct kw_vpend);
} kw_vpend SEC(".maps");

static __always_inline struct kw_vpend *pend_get(int create)
{
	return bpf_task_storage_get(&kw_vpend, bpf_get_current_task_btf(), NULL,
				    create ? BPF_LOCAL_STORAGE_GET_F_CREATE : 0);
}

static __always_inline struct task_struct *cur(void)
{
	return (struct task_struct *)bpf_get_current_task();
}

/* At an LSM path hook: remember (dir, dentry) for the vfs_* call, when the op is wanted and the process not excluded. */
static __always_inline struct kw_vpend *hook(__u32 op, const struct path *dir, struct dentry *dentry)
{
	if (!wanted(op, cur()))
		return NULL;
	struct kw_vpend *p = pend_get(1);
	if (!p)
		return NULL;
	p->op = op;
	p->mode = 0;
	p->flags = 0;
	p->dir = (__u64)BPF_CORE_READ(dir, dentry);
	p->dir_mnt = (__u64)BPF_CORE_READ(dir, mnt);
	p->dentry = (__u64)dentry;
	p->dir2 = p->dir2_mnt = p->dentry2 = 0;
	return p;
}

/* At the vfs_* exit: the pending hook of this thread for op on dentry, consumed (NULL: none, or another call's). */
static __always_inline struct kw_vpend *take(__u32 op, __u64 dentry, int second)
{
	struct kw_vpend *p = pend_get(0);
	if (!p || p->op != op || (second ? p->dentry2 : p->dentry) != dentry)
		return NULL;
	p->op = 0;
	return p;
}

/* The name of a dentry held as a number (a local: CO-RE must see a kernel type's access, not kw_vpend's field). */
static __always_inline const void *dentry_name(__u64 dentry)
{
	struct dentry *d = (struct dentry *)dentry;
	return BPF_CORE_READ(d, d_name.name);
}

static __always_inline __u32 copy_name(struct kw_scratch *s, __u32 off, const void *name)
{
	long n = bpf_probe_read_kernel_str(&s->data[off & DATA_MASK], NAME_LEN_MAX + 1, name);
	return n > 0 ? (__u32)(n - 1) & NAME_LEN_MAX : 0;
}

static __always_inline __u32 copy_target(struct kw_scratch *s, __u32 off, const void *target)
{
	long n = bpf_probe_read_kernel_str(&s->data[off & DATA_MASK], KW_SLOT_MAX, target);
	return n > 0 ? (__u32)(n - 1) & (KW_SLOT_MAX - 1) : 0;
}

/*
 * A record whose path is one walk: the object itself (an open or closed file, the target of chmod, chown, truncate,
 * utimes, xattrs). Reported when the walk passed a watched directory (or was cut: then userspace sees it, flagged).
 */
static __always_inline int emit_object(__u32 op, long ret, __u64 dentry, __u64 mnt, __u32 ftype, __u32 flags,
				       __u32 mode, __s32 uid, __s32 gid)
{
	struct kw_config *cfg = kw_config_get();
	if (!cfg || !dentry || !mnt)
		return 0;
	struct kw_scratch *s = begin(cur(), op, ret);
	if (!s)
		return 0;
	__u8 check = cfg->use_roots ? 1 : 0;
	__u8 roots = 0;
	__u16 trunc = 0;
	__u32 n = walk_path(s, (struct dentry *)dentry, (struct vfsmount *)mnt, 0, check, &roots, &trunc, 0);
	if (check && !(roots & ROOT_IN) && !trunc)
		return 0;
	struct kw_event *e = &s->ev;
	e->mntns = mount_ns(mnt);
	e->len[0] = n;
	e->ftype = ftype;
	e->flags = flags;
	e->mode = mode;
	e->owner_uid = uid;
	e->owner_gid = gid;
	e->in_root = roots & ROOT_IN;
	e->trunc = trunc;
	finish(s, n);
	return 0;
}

/*
 * A record of a directory entry: slot 0 the parent's walk, slot 1 the entry's name; for rename and link, slots 2
 * and 3 the same for the destination (link's slot 0 is the existing file's whole path, slot 1 empty); for symlink,
 * slot 3 the target. Reported when either parent is in a watched tree, or is a directory above one (the name may be
 * the tree's root: userspace decides, exactly, as the name has no "/" or "..").
 */
static __always_inline int emit_entry(struct kw_vpend *p, __u32 op, long ret, __u32 ftype, const void *target)
{
	struct kw_config *cfg = kw_config_get();
	if (!cfg)
		return 0;
	struct kw_scratch *s = begin(cur(), op, ret);
	if (!s)
		return 0;
	struct kw_event *e = &s->ev;
	/* both paths of a rename or link are on one mount (EXDEV otherwise), so in one namespace */
	e->mntns = mount_ns(op == KW_LINK ? p->dir2_mnt : p->dir_mnt);
	__u8 check = cfg->use_roots ? 1 : 0;
	__u8 roots = 0;
	__u16 trunc = 0;
	__u32 off = 0, n;
	if (op == KW_LINK) {
		/* a link stays on its mount (EXDEV otherwise): the existing file is reached through the destination's */
		n = walk_path(s, (struct dentry *)p->dentry, (struct vfsmount *)p->dir2_mnt, 0, check, &roots, &trunc, 0);
		e->len[0] = n;
		off = n;
	} else {
		n = walk_path(s, (struct dentry *)p->dir, (struct vfsmount *)p->dir_mnt, 0, check, &roots, &trunc, 0);
		e->len[0] = n;
		off = n;
		if (op == KW_RENAME)
			n = copy_name(s, off, p->name1);
		else
			n = copy_name(s, off, dentry_name(p->dentry));
		e->len[1] = n;
		off += n;
	}
	if (op == KW_SYMLINK) {
		n = copy_target(s, off, target);
		e->len[3] = n;
		off += n;
	} else if (p->dentry2) {
		n = walk_path(s, (struct dentry *)p->dir2, (struct vfsmount *)p->dir2_mnt, off, check, &roots, &trunc, 2);
		e->len[2] = n;
		off += n;
		if (op == KW_RENAME)
			n = copy_name(s, off, p->name2);
		else
			n = copy_name(s, off, dentry_name(p->dentry2));
		e->len[3] = n;
		off += n;
	}
	if (check && !(roots & (ROOT_IN | ROOT_ANCESTOR)) && !trunc)
		return 0;
	e->ftype = ftype;
	e->flags = p->flags;
	e->mode = p->mode;
	e->in_root = roots & ROOT_IN;
	e->trunc = trunc;
	finish(s, off);
	return 0;
}

/* ---- directory entries: LSM path hook (entry) + vfs_* (exit) -------------------------------------------------- */

SEC("fentry/security_path_unlink")
int BPF_PROG(kw_hook_unlink, const struct path *dir, struct dentry *dentry)
{
	hook(KW_UNLINK, dir, dentry);
	return 0;
}

SEC("fexit/vfs_unlink")
int BPF_PROG(kw_vfs_unlink, void *idmap, struct inode *dir, struct dentry *dentry, void *deleg, int ret)
{
	struct kw_vpend *p = take(KW_UNLINK, (__u64)dentry, 0);
	if (p && !ret)
		emit_entry(p, KW_UNLINK, ret, 0, NULL);
	return 0;
}

SEC("fentry/security_path_rmdir")
int BPF_PROG(kw_hook_rmdir, const struct path *dir, struct dentry *dentry)
{
	hook(KW_RMDIR, dir, dentry);
	return 0;
}

SEC("fexit/vfs_rmdir")
int BPF_PROG(kw_vfs_rmdir, void *idmap, struct inode *dir, struct dentry *dentry, int ret)
{
	struct kw_vpend *p = take(KW_RMDIR, (__u64)dentry, 0);
	if (p && !ret)
		emit_entry(p, KW_RMDIR, ret, S_IFDIR, NULL);
	return 0;
}

SEC("fentry/security_path_mkdir")
int BPF_PROG(kw_hook_mkdir, const struct path *dir, struct dentry *dentry, umode_t mode)
{
	struct kw_vpend *p = hook(KW_MKDIR, dir, dentry);
	if (p)
		p->mode = mode; /* after the umask */
	return 0;
}

/*
 * vfs_mkdir comes in two prototypes, so in two programs, and the loader keeps the one the running kernel's BTF
 * says (kwatch/capture/bpf.py, FEXIT_VARIANTS): the verifier would take either on either kernel, reading the
 * return value as the wrong type. Up to Linux 6.14 it returns an int.
 */
SEC("fexit/vfs_mkdir")
int BPF_PROG(kw_vfs_mkdir, void *idmap, struct inode *dir, struct dentry *dentry, umode_t mode, int ret)
{
	struct kw_vpend *p = take(KW_MKDIR, (__u64)dentry, 0);
	if (p && !ret)
		emit_entry(p, KW_MKDIR, ret, S_IFDIR, NULL);
	return 0;
}

#define MAX_ERRNO 4095

/*
 * Since Linux 6.15 ("Change inode_operations.mkdir to return struct dentry *") it returns the
 * new directory's dentry, or an ERR_PTR. A filesystem may give another dentry than the one passed in (which
 * vfs_mkdir then drops): the name is read from the returned one, the parent from the LSM hook's path as before.
 */
SEC("fexit/vfs_mkdir")
int BPF_PROG(kw_vfs_mkdir_dentry, void *idmap, struct inode *dir, struct dentry *dentry, umode_t mode,
	     struct dentry *ret)
{
	/* the returned pointer as a plain number (an ERR_PTR is not a pointer to read through) */
	__u64 made = 0;
	bpf_probe_read_kernel(&made, sizeof(made), &ret);
	struct kw_vpend *p = take(KW_MKDIR, (__u64)dentry, 0);
	if (!p || !made || made >= (__u64)-MAX_ERRNO)
		return 0;
	p->dentry = made;
	return emit_entry(p, KW_MKDIR, 0, S_IFDIR, NULL);
}

SEC("fentry/security_path_symlink")
int BPF_PROG(kw_hook_symlink, const struct path *dir, struct dentry *dentry, const char *old_name)
{
	hook(KW_SYMLINK, dir, dentry);
	return 0;
}

SEC("fexit/vfs_symlink")
int BPF_PROG(kw_vfs_symlink, void *idmap, struct inode *dir, struct dentry *dentry, const char *oldname, int ret)
{
	struct kw_vpend *p = take(KW_SYMLINK, (__u64)dentry, 0);
	if (p && !ret)
		emit_entry(p, KW_SYMLINK, ret, S_IFLNK, oldname);
	return 0;
}

SEC("fentry/security_path_link")
int BPF_PROG(kw_hook_link, struct dentry *old_dentry, const struct path *new_dir, struct dentry *new_dentry)
{
	if (!wanted(KW_LINK, cur()))
		return 0;
	struct kw_vpend *p = pend_get(1);
	if (!p)
		return 0;
	p->op = KW_LINK;
	p->mode = p->flags = 0;
	p->dir = p->dir_mnt = 0;
	p->dentry = (__u64)old_dentry;
	p->dir2 = (__u64)BPF_CORE_READ(new_dir, dentry);
	p->dir2_mnt = (__u64)BPF_CORE_READ(new_dir, mnt);
	p->dentry2 = (__u64)new_dentry;
	return 0;
}

SEC("fexit/vfs_link")
int BPF_PROG(kw_vfs_link, struct dentry *old_dentry, void *idmap, struct inode *dir, struct dentry *new_dentry,
	     void *deleg, int ret)
{
	struct kw_vpend *p = take(KW_LINK, (__u64)new_dentry, 1);
	if (p && !ret)
		emit_entry(p, KW_LINK, ret, KR(KP(struct dentry, old_dentry), d_inode, i_mode) & S_IFMT, NULL);
	return 0;
}

/*
 * Renames change paths: the path cache is invalidated at the hook and again at the exit (as the tracepoint program
 * does around the syscall), so a path resolved while a rename runs is not kept.
 */
SEC("fentry/security_path_rename")
int BPF_PROG(kw_hook_rename, const struct path *old_dir, struct dentry *old_dentry, const struct path *new_dir,
	     struct dentry *new_dentry, unsigned int flags)
{
	rename_gen_bump();
	struct kw_vpend *p = hook(KW_RENAME, old_dir, old_dentry);
	if (!p)
		return 0;
	p->flags = flags;
	p->dir2 = (__u64)BPF_CORE_READ(new_dir, dentry);
	p->dir2_mnt = (__u64)BPF_CORE_READ(new_dir, mnt);
	p->dentry2 = (__u64)new_dentry;
	bpf_probe_read_kernel_str(p->name1, sizeof(p->name1), BPF_CORE_READ(old_dentry, d_name.name));
	bpf_probe_read_kernel_str(p->name2, sizeof(p->name2), BPF_CORE_READ(new_dentry, d_name.name));
	return 0;
}

SEC("fexit/vfs_rename")
int BPF_PROG(kw_vfs_rename, struct renamedata *rd, int ret)
{
	rename_gen_bump();
	struct kw_vpend *p = take(KW_RENAME, (__u64)BPF_CORE_READ(rd, old_dentry), 0);
	if (!p || ret)
		return 0;
	__u64 moved = p->dentry;
	return emit_entry(p, KW_RENAME, ret, KR(KP(struct dentry, moved), d_inode, i_mode) & S_IFMT, NULL);
}

/* ---- attributes ------------------------------------------------------------------------------------------------ */

/* chmod and chown of any kind (by name, by descriptor, io_uring has neither) reach notify_change after the hook */
SEC("fentry/security_path_chmod")
int BPF_PROG(kw_hook_chmod, const struct path *path, umode_t mode)
{
	struct kw_vpend *p = hook(KW_CHMOD, path, BPF_CORE_READ(path, dentry));
	if (p)
		p->mode = mode & S_IALLUGO;
	return 0;
}

SEC("fentry/security_path_chown")
int BPF_PROG(kw_hook_chown, const struct path *path)
{
	hook(KW_CHOWN, path, BPF_CORE_READ(path, dentry));
	return 0;
}

SEC("fexit/notify_change")
int BPF_PROG(kw_notify_change, void *idmap, struct dentry *dentry, struct iattr *attr, void *deleg, int ret)
{
	struct kw_vpend *p = pend_get(0);
	if (!p || (p->op != KW_CHMOD && p->op != KW_CHOWN) || p->dentry != (__u64)dentry)
		return 0;
	__u32 op = p->op;
	p->op = 0;
	if (ret)
		return 0;
	__u32 valid = BPF_CORE_READ(attr, ia_valid);
	__u32 ftype = KR(KP(struct dentry, dentry), d_inode, i_mode) & S_IFMT;
	if (op == KW_CHMOD)
		return emit_object(op, ret, p->dentry, p->dir_mnt, ftype, 0, p->mode, -1, -1);
	__s32 uid = (valid & ATTR_UID) ? (__s32)BPF_CORE_READ(attr, ia_uid.val) : -1;
	__s32 gid = (valid & ATTR_GID) ? (__s32)BPF_CORE_READ(attr, ia_gid.val) : -1;
	return emit_object(op, ret, p->dentry, p->dir_mnt, ftype, 0, 0, uid, gid);
}

SEC("fexit/vfs_utimes")
int BPF_PROG(kw_vfs_utimes, const struct path *path, void *times, int ret)
{
	if (ret || !wanted(KW_UTIMES, cur()))
		return 0;
	struct dentry *d = BPF_CORE_READ(path, dentry);
	return emit_object(KW_UTIMES, ret, (__u64)d, (__u64)BPF_CORE_READ(path, mnt),
			   KR(KP(struct dentry, d), d_inode, i_mode) & S_IFMT, 0, 0, -1, -1);
}

/* truncate(2) by name */
SEC("fexit/vfs_truncate")
int BPF_PROG(kw_vfs_truncate, const struct path *path, loff_t length, long ret)
{
	if ((int)ret || !wanted(KW_TRUNCATE, cur()))
		return 0;
	return emit_object(KW_TRUNCATE, 0, (__u64)BPF_CORE_READ(path, dentry), (__u64)BPF_CORE_READ(path, mnt),
			   S_IFREG, 0, 0, -1, -1);
}

/* ftruncate(2) and io_uring's: do_truncate with the file (vfs_truncate passes none; an O_TRUNC open passes ATTR_OPEN) */
SEC("fexit/do_truncate")
int BPF_PROG(kw_do_truncate, void *idmap, struct dentry *dentry, loff_t length, unsigned int time_attrs,
	     struct file *filp, int ret)
{
	if (ret || !filp || (time_attrs & ATTR_OPEN) || !wanted(KW_TRUNCATE, cur()))
		return 0;
	return emit_object(KW_TRUNCATE, 0, (__u64)BPF_CORE_READ(filp, f_path.dentry),
			   (__u64)BPF_CORE_READ(filp, f_path.mnt), S_IFREG, 0, 0, -1, -1);
}

/* ---- xattrs: the mount from the write access asked for just before ------------------------------------------- */

static __always_inline void remember_wmnt(__u64 mnt)
{
	if (!wanted(KW_XATTR, cur()))
		return;
	struct kw_vpend *p = pend_get(1);
	if (p)
		p->wmnt = mnt;
}

SEC("fentry/mnt_want_write")
int BPF_PROG(kw_want_write, struct vfsmount *m)
{
	remember_wmnt((__u64)m);
	return 0;
}

SEC("fentry/mnt_want_write_file")
int BPF_PROG(kw_want_write_file, struct file *file)
{
	remember_wmnt((__u64)BPF_CORE_READ(file, f_path.mnt));
	return 0;
}

static __always_inline int xattr_done(struct dentry *arg, int ret)
{
	/* the argument as a plain number: the verifier passes no typed pointer to the walk (a global function) */
	__u64 dentry = 0;
	bpf_probe_read_kernel(&dentry, sizeof(dentry), &arg);
	if (ret || !wanted(KW_XATTR, cur()))
		return 0;
	struct kw_vpend *p = pend_get(0);
	if (!p || !p->wmnt)
		return 0;
	__u64 mnt = p->wmnt;
	p->wmnt = 0;
	/* a nested write elsewhere (overlayfs's upper layer) left another mount: never guess a path from it */
	if (KR(KP(struct vfsmount, mnt), mnt_sb) != KR(KP(struct dentry, dentry), d_sb))
		return 0;
	return emit_object(KW_XATTR, 0, dentry, mnt, KR(KP(struct dentry, dentry), d_inode, i_mode) & S_IFMT, 0, 0, -1,
			   -1);
}

SEC("fexit/vfs_setxattr")
int BPF_PROG(kw_vfs_setxattr, void *idmap, struct dentry *dentry, const char *name, const void *value, size_t size,
	     int flags, int ret)
{
	return xattr_done(dentry, ret);
}

SEC("fexit/vfs_removexattr")
int BPF_PROG(kw_vfs_removexattr, void *idmap, struct dentry *dentry, const char *name, int ret)
{
	return xattr_done(dentry, ret);
}

/* ---- open and last close --------------------------------------------------------------------------------------- */

/*
 * vfs_open: every open of a path that reaches a file (syscalls, io_uring, in-kernel openers); CREATE when this open
 * made the file. f_flags no longer holds O_CREAT/O_EXCL/O_TRUNC here (do_dentry_open clears them): O_CREAT is put
 * back for a creation, O_TRUNC is not known.
 */
SEC("fexit/vfs_open")
int BPF_PROG(kw_vfs_open, const struct path *path, struct file *file, int ret)
{
	if (ret)
		return 0;
	__u32 fmode = BPF_CORE_READ(file, f_mode);
	__u32 imode = BPF_CORE_READ(file, f_inode, i_mode);
	if ((imode & S_IFMT) != S_IFREG)
		return 0;
	__u32 op;
	__u32 flags = BPF_CORE_READ(file, f_flags);
	if (fmode & FMODE_CREATED) {
		op = KW_CREATE;
		flags |= O_CREAT;
	} else if (fmode & FMODE_WRITE) {
		op = KW_OPEN_WRITE;
	} else {
		return 0;
	}
	if (!wanted(op, cur()))
		return 0;
	return emit_object(op, 0, (__u64)BPF_CORE_READ(file, f_path.dentry), (__u64)BPF_CORE_READ(file, f_path.mnt),
			   S_IFREG, flags, imode & S_IALLUGO, -1, -1);
}

SEC("fentry/__fput")
int BPF_PROG(kw_fput, struct file *file)
{
	if (!(BPF_CORE_READ(file, f_mode) & FMODE_WRITE))
		return 0;
	if ((BPF_CORE_READ(file, f_inode, i_mode) & S_IFMT) != S_IFREG || !wanted(KW_CLOSE_WRITE, cur()))
		return 0;
	return emit_object(KW_CLOSE_WRITE, 0, (__u64)BPF_CORE_READ(file, f_path.dentry),
			   (__u64)BPF_CORE_READ(file, f_path.mnt), S_IFREG, BPF_CORE_READ(file, f_flags), 0, -1, -1);
}

SEC("tp/sched/sched_process_exit")
int kw_process_exit(void *ctx)
{
	forget_excluded(KP(struct task_struct, bpf_get_current_task()));
	return 0;
}
