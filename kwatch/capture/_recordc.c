// SPDX-License-Identifier: GPL-2.0
/*
 * The BPF consumer's hot loop in C: find the records in the ring buffer and turn them into FileEvent tuples.
 *
 * kwatch/capture/record.py holds the reference decoder in Python and uses this module when it is built (`make ext`).
 * Only the common shapes are decoded here: one resolved path, or a resolved directory plus a plain name (no "/",
 * not "." or ".."). Every other record (two paths, symlinks, absolute or dotted names, an unknown op) is handed to
 * the Python decoder, so the path rules live in one place. tests/unit/test_record_decode.py checks that both decoders
 * agree on every record shape.
 *
 * The record layout comes from the same header as the kernel's (bpf/kwatch.h).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <linux/types.h>
#include <string.h>

#include "kwatch.h"

/* FileEvent fields, in order (kwatch/events.py) */
enum {
	F_OP, F_PATH, F_NEW_PATH, F_TARGET, F_PID, F_TID, F_PPID, F_UID, F_GID, F_COMM, F_CGROUP, F_TS, F_RET,
	F_FLAGS, F_MODE, F_OWNER, F_FTYPE, F_TRUNCATED, F_LOST, F_BACKEND, F_EXTRA, F_MNTNS, F_COUNT
};

#define RB_BUSY (1u << 31)
#define RB_DISCARD (1u << 30)
#define RB_HDR 8

static PyTypeObject *event_type;   /* kwatch.events.FileEvent */
static PyObject *ops[KW_OP_MAX];   /* Op members by number, NULL where none */
static PyObject *slow_decode;      /* record._decode_one(buf, off) -> FileEvent */
static PyObject *backend_name;     /* "bpf" */
static __u32 own_mntns;            /* kwatch's mount namespace: a record of another one takes the slow path */

/* One-entry caches: consecutive records mostly come from one process, so its numbers are shared, not rebuilt. */
struct cache {
	unsigned long long key;
	PyObject *obj;
};

static PyObject *cached_long(struct cache *c, unsigned long long v)
{
	if (c->obj && c->key == v) {
		Py_INCREF(c->obj);
		return c->obj;
	}
	PyObject *o = PyLong_FromUnsignedLongLong(v);
	if (!o)
		return NULL;
	Py_XSETREF(c->obj, o);
	c->key = v;
	Py_INCREF(o);
	return o;
}

struct state {
	struct cache pid, tid, ppid, uid, gid, cgroup, flags, ftype, mode;
	char comm_key[KW_COMM_LEN];
	PyObject *comm;
};

static void state_clear(struct state *st)
{
	struct cache *all[] = { &st->pid, &st->tid, &st->ppid, &st->uid, &st->gid, &st->cgroup, &st->flags,
				&st->ftype, &st->mode };
	for (size_t i = 0; i < sizeof(all) / sizeof(all[0]); i++)
		Py_CLEAR(all[i]->obj);
	Py_CLEAR(st->comm);
}

static PyObject *comm_of(struct state *st, const char *raw)
{
	if (!st->comm || memcmp(st->comm_key, raw, KW_COMM_LEN) != 0) {
		PyObject *o = PyBytes_FromStringAndSize(raw, strnlen(raw, KW_COMM_LEN));
		if (!o)
			return NULL;
		Py_XSETREF(st->comm, o);
		memcpy(st->comm_key, raw, KW_COMM_LEN);
	}
	Py_INCREF(st->comm);
	return st->comm;
}

/* The joined path for a plain name, or NULL with no error set when the record needs the Python decoder. */
static PyObject *plain_join(const char *base, size_t lb, const char *name, size_t ln)
{
	if (!lb || !ln || memchr(name, '/', ln) || (ln == 1 && name[0] == '.') ||
	    (ln == 2 && name[0] == '.' && name[1] == '.'))
		return NULL;
	int root = lb == 1 && base[0] == '/';
	size_t n = (root ? 0 : lb) + 1 + ln;
	PyObject *o = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
	if (!o)
		return NULL;
	char *d = PyBytes_AS_STRING(o);
	if (!root) {
		memcpy(d, base, lb);
		d += lb;
	}
	*d++ = '/';
	memcpy(d, name, ln);
	return o;
}

static int is_mode_op(__u32 op)
{
	return op == KW_CHMOD || op == KW_MKDIR || op == KW_CREATE;
}

/* Build the FileEvent for the record at buf[off:], or return Py_None (borrowed) when it needs the slow path. */
static PyObject *fast_event(struct state *st, const char *buf, Py_ssize_t size, Py_ssize_t off)
{
	struct kw_event e;
	if (off < 0 || off > size - (Py_ssize_t)sizeof(e)) {
		PyErr_Format(PyExc_ValueError, "record at %zd runs past the buffer (%zd bytes)", off, size);
		return NULL;
	}
	memcpy(&e, buf + off, sizeof(e));
	const char *p = buf + off + sizeof(e);
	size_t l0 = e.len[0], l1 = e.len[1];
	if ((Py_ssize_t)(off + sizeof(e) + l0 + l1 + e.len[2] + e.len[3]) > size) {
		PyErr_Format(PyExc_ValueError, "record at %zd runs past the buffer (%zd bytes)", off, size);
		return NULL;
	}
	if (e.op >= KW_OP_MAX || !ops[e.op] || e.len[2] || e.len[3] || e.op == KW_SYMLINK ||
	    (e.mntns && e.mntns != own_mntns))
		return Py_None;
	PyObject *path;
	if (!l1) {
		path = PyBytes_FromStringAndSize(p, (Py_ssize_t)l0);
	} else {
		path = plain_join(p, l0, p + l0, l1);
		if (!path)
			return PyErr_Occurred() ? NULL : Py_None;
	}
	if (!path)
		return NULL;

	PyObject *ev = event_type->tp_alloc(event_type, F_COUNT);
	if (!ev) {
		Py_DECREF(path);
		return NULL;
	}
	PyObject *v[F_COUNT];
	v[F_OP] = ops[e.op];
	Py_INCREF(v[F_OP]);
	v[F_PATH] = path;
	v[F_NEW_PATH] = v[F_TARGET] = v[F_LOST] = v[F_EXTRA] = v[F_MNTNS] = Py_None;
	Py_INCREF(Py_None);
	Py_INCREF(Py_None);
	Py_INCREF(Py_None);
	Py_INCREF(Py_None);
	Py_INCREF(Py_None);
	v[F_PID] = cached_long(&st->pid, e.pid);
	v[F_TID] = cached_long(&st->tid, e.tid);
	v[F_PPID] = cached_long(&st->ppid, e.ppid);
	v[F_UID] = cached_long(&st->uid, e.uid);
	v[F_GID] = cached_long(&st->gid, e.gid);
	v[F_COMM] = comm_of(st, e.comm);
	v[F_CGROUP] = cached_long(&st->cgroup, e.cgroup_id);
	v[F_TS] = PyLong_FromUnsignedLongLong(e.ts_ns);
	v[F_RET] = PyLong_FromLong(e.ret);
	v[F_FLAGS] = cached_long(&st->flags, e.flags);
	if (is_mode_op(e.op)) {
		v[F_MODE] = cached_long(&st->mode, e.mode);
	} else {
		v[F_MODE] = Py_None;
		Py_INCREF(Py_None);
	}
	if (e.op == KW_CHOWN) {
		v[F_OWNER] = Py_BuildValue("(ii)", e.owner_uid, e.owner_gid);
	} else {
		v[F_OWNER] = Py_None;
		Py_INCREF(Py_None);
	}
	v[F_FTYPE] = cached_long(&st->ftype, e.ftype);
	v[F_TRUNCATED] = e.trunc ? Py_True : Py_False;
	Py_INCREF(v[F_TRUNCATED]);
	v[F_BACKEND] = backend_name;
	Py_INCREF(backend_name);
	int failed = 0;
	for (int i = 0; i < F_COUNT; i++) {
		if (!v[i])
			failed = 1;
		PyTuple_SET_ITEM(ev, i, v[i]); /* a NULL item is fine for the dealloc below */
	}
	if (failed) {
		Py_DECREF(ev);
		return NULL;
	}
	return ev;
}

static PyObject *decode_list(const char *buf, Py_ssize_t size, PyObject *bufobj, const Py_ssize_t *offs,
			     Py_ssize_t n)
{
	struct state st = { 0 };
	PyObject *out = PyList_New(n);
	if (!out)
		return NULL;
	for (Py_ssize_t i = 0; i < n; i++) {
		PyObject *ev = fast_event(&st, buf, size, offs[i]);
		if (ev == Py_None) {
			PyObject *o = PyLong_FromSsize_t(offs[i]);
			ev = o ? PyObject_CallFunctionObjArgs(slow_decode, bufobj, o, NULL) : NULL;
			Py_XDECREF(o);
		}
		if (!ev) {
			state_clear(&st);
			Py_DECREF(out);
			return NULL;
		}
		PyList_SET_ITEM(out, i, ev);
	}
	state_clear(&st);
	return out;
}

/* decode(buf, offsets) -> list[FileEvent] */
static PyObject *py_decode(PyObject *self, PyObject *args)
{
	PyObject *bufobj, *offsets;
	if (!PyArg_ParseTuple(args, "OO!:decode", &bufobj, &PyList_Type, &offsets))
		return NULL;
	if (!event_type) {
		PyErr_SetString(PyExc_RuntimeError, "_recordc.configure() was not called");
		return NULL;
	}
	Py_buffer view;
	if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	Py_ssize_t n = PyList_GET_SIZE(offsets);
	Py_ssize_t *offs = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(*offs));
	PyObject *out = NULL;
	if (!offs) {
		PyErr_NoMemory();
		goto done;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		offs[i] = PyLong_AsSsize_t(PyList_GET_ITEM(offsets, i));
		if (offs[i] == -1 && PyErr_Occurred())
			goto done;
	}
	out = decode_list(view.buf, view.len, bufobj, offs, n);
done:
	PyMem_Free(offs);
	PyBuffer_Release(&view);
	return out;
}

/*
 * scan(data, pos, prod, mask, limit) -> (offsets, pos): walk the ring buffer records from consumer position pos up
 * to the producer position prod, stopping at a record still being written (BUSY); discarded records are skipped.
 * data is the data area mapped twice (kernel/bpf/ringbuf.c), so a record that wraps is contiguous at pos & mask.
 */
static PyObject *py_scan(PyObject *self, PyObject *args)
{
	PyObject *bufobj;
	unsigned long long pos, prod, mask;
	Py_ssize_t limit;
	if (!PyArg_ParseTuple(args, "OKKKn:scan", &bufobj, &pos, &prod, &mask, &limit))
		return NULL;
	Py_buffer view;
	if (PyObject_GetBuffer(bufobj, &view, PyBUF_SIMPLE) < 0)
		return NULL;
	PyObject *offsets = PyList_New(0);
	if (!offsets)
		goto fail;
	const char *data = view.buf;
	Py_ssize_t n = 0;
	while (pos < prod && n < limit) {
		unsigned long long off = pos & mask;
		if ((Py_ssize_t)(off + RB_HDR) > view.len) {
			PyErr_SetString(PyExc_ValueError, "ring buffer position outside the mapping");
			goto fail;
		}
		/* acquire: the body is read only after BUSY was seen clear (the kernel's commit is an xchg) */
		__u32 hdr = __atomic_load_n((const __u32 *)(data + off), __ATOMIC_ACQUIRE);
		if (hdr & RB_BUSY)
			break;
		__u32 len = hdr & ~(RB_BUSY | RB_DISCARD);
		if (!(hdr & RB_DISCARD)) {
			PyObject *o = PyLong_FromUnsignedLongLong(off + RB_HDR);
			if (!o || PyList_Append(offsets, o) < 0) {
				Py_XDECREF(o);
				goto fail;
			}
			Py_DECREF(o);
			n++;
		}
		pos += (len + RB_HDR + 7) & ~7ull;
	}
	PyBuffer_Release(&view);
	PyObject *res = Py_BuildValue("(NK)", offsets, pos);
	return res;
fail:
	Py_XDECREF(offsets);
	PyBuffer_Release(&view);
	return NULL;
}

/* configure(FileEvent, ops_by_number, slow_decode, own_mntns) */
static PyObject *py_configure(PyObject *self, PyObject *args)
{
	PyObject *type, *oplist, *slow;
	unsigned int mntns;
	if (!PyArg_ParseTuple(args, "O!O!OI:configure", &PyType_Type, &type, &PyList_Type, &oplist, &slow,
			      &mntns))
		return NULL;
	if (!PyType_IsSubtype((PyTypeObject *)type, &PyTuple_Type)) {
		PyErr_SetString(PyExc_TypeError, "FileEvent must be a tuple type");
		return NULL;
	}
	for (int i = 0; i < KW_OP_MAX; i++) {
		PyObject *o = i < PyList_GET_SIZE(oplist) ? PyList_GET_ITEM(oplist, i) : Py_None;
		Py_XINCREF(o == Py_None ? NULL : o);
		Py_XSETREF(ops[i], o == Py_None ? NULL : o);
	}
	Py_INCREF(type);
	Py_XSETREF(event_type, (PyTypeObject *)type);
	Py_INCREF(slow);
	Py_XSETREF(slow_decode, slow);
	own_mntns = mntns;
	if (!backend_name && !(backend_name = PyUnicode_InternFromString("bpf")))
		return NULL;
	Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
	{ "configure", py_configure, METH_VARARGS, "configure(FileEvent, ops_by_number, slow_decode, own_mntns)" },
	{ "decode", py_decode, METH_VARARGS, "decode(buf, offsets) -> list of FileEvent" },
	{ "scan", py_scan, METH_VARARGS, "scan(data, pos, prod, mask, limit) -> (offsets, pos)" },
	{ NULL, NULL, 0, NULL },
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "_recordc", "kwatch's BPF record decoder in C (see record.py).", -1, methods,
	NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__recordc(void)
{
	return PyModule_Create(&module);
}
