/* SPDX-License-Identifier: GPL-2.0 */
/*
 * The kernel record kwatch streams through its ring buffer, defined once here and mirrored once in
 * kwatch/capture/record.py (tests/unit/test_record_layout.py checks that sizes and offsets agree).
 *
 * A record is a fixed header followed by up to four strings ("slots"), packed, not NUL-terminated, whose lengths
 * are in kw_event.len[]:
 *   slot 0  base of the first path: an absolute directory resolved in the kernel (dirfd or cwd), or, for calls on a
 *           file descriptor or an opened file, the file's own absolute path (then slot 1 is empty)
 *   slot 1  the name the syscall was given for the first path, as the process passed it (may be absolute)
 *   slot 2  base of the second path (rename/link destination); for SYMLINK: empty
 *   slot 3  name of the second path; for SYMLINK: the link's target as given
 * Userspace joins base and name and resolves "." and ".." lexically.
 */
#ifndef KWATCH_H
#define KWATCH_H

#define KW_SLOTS 4
#define KW_SLOT_MAX 4096  /* longest string in one slot (PATH_MAX); longer is cut and flagged in trunc */
#define KW_COMM_LEN 16

enum kw_op {
	KW_OPEN_WRITE = 1,
	KW_CREATE = 2,
	KW_CLOSE_WRITE = 3,
	KW_MKDIR = 4,
	KW_RMDIR = 5,
	KW_UNLINK = 6,
	KW_RENAME = 7,
	KW_SYMLINK = 8,
	KW_LINK = 9,
	KW_CHMOD = 10,
	KW_CHOWN = 11,
	KW_XATTR = 12,
	KW_TRUNCATE = 13,
	KW_UTIMES = 14,
	KW_OP_MAX = 15,
};

struct kw_event {
	__u64 ts_ns;      /* bpf_ktime_get_ns() at syscall exit */
	__u64 cgroup_id;
	__u32 pid;        /* tgid */
	__u32 tid;
	__u32 ppid;       /* real_parent's tgid */
	__u32 uid;
	__u32 gid;
	__s32 ret;
	__u32 op;         /* enum kw_op */
	__u32 flags;      /* open flags, rename flags, AT_* flags, as given */
	__u32 mode;       /* chmod / mkdir / creat mode */
	__u32 ftype;      /* S_IFMT bits of the object, 0 if unknown */
	__s32 owner_uid;  /* chown arguments (-1: unchanged) */
	__s32 owner_gid;
	__u16 len[KW_SLOTS];
	__u16 trunc;      /* bit i set: slot i was cut (too long or too deep) */
	__u16 in_root;    /* 1: the kernel saw the path inside a watched tree; 0: unknown (userspace decides) */
	__u32 mntns;      /* the mount namespace the paths are relative to (its inode number, as /proc/PID/ns/mnt
			   * shows it): the process's (tracepoints) or the resolved mount's (VFS); 0: unknown */
	char comm[KW_COMM_LEN];
};

#define KW_MAX_ROOT_PATHS 16  /* watched roots the kernel filters on (more: userspace filters alone) */

/* Runtime configuration, one entry of the "kw_cfg" array map, written by userspace at any time. */
struct kw_config {
	__u32 op_mask;     /* bit (1 << op) set: report op */
	__u32 self_tgid;   /* never report this process (kwatch itself) */
	__u32 use_roots;   /* 1: drop events that are provably outside every watched tree */
	__u32 use_excl;    /* 1: drop events of processes in kw_excl (kept with their descendants at fork) */
	/*
	 * Wake-up policy of the ring buffer (each wake-up costs the producer an irq_work and the consumer a read): a
	 * record wakes the consumer when the buffer was empty and the last such wake-up is wake_us old, or when
	 * wake_bytes are waiting. Meanwhile a consumer that saw data in the last 2 * wake_us polls every wake_us.
	 */
	__u32 wake_us;
	__u32 wake_bytes;
	/*
	 * Inode numbers of the watched roots (kw_roots holds the same with their devices): the path walk compares
	 * each directory it passes with these and looks kw_roots up only on a match.
	 */
	__u32 n_root_inos;
	__u32 cfg_gen;     /* changed by every configuration write: paths cached in the kernel are resolved again */
	__u64 root_ino[KW_MAX_ROOT_PATHS];
};

/*
 * Key of the "kw_roots" hash map: a directory's inode; dev is the kernel's s_dev (major << 20 | minor). The value
 * says whether it is a watched tree's top, or a directory above one.
 */
#define KW_ROOT_WATCHED 1
#define KW_ROOT_ANCESTOR 2
struct kw_inode_key {
	__u64 ino;
	__u32 dev;
	__u32 _pad;
};

/* One watched root as a string (value of the "kw_root_paths" array; the list ends at the first len == 0). */
#define KW_ROOT_PATH_MAX 256
struct kw_root_path {
	__u32 len;
	char path[KW_ROOT_PATH_MAX];
};

#endif /* KWATCH_H */
