/* The rsync client's file-list encoder in C: kwatch/protocols/rsync/flist.py's FlistEncoder.encode for a whole
 * list in one call, for the case every rsync >= 3.2 daemon negotiates (protocol >= 30, varint flags, no hard links).
 * It writes byte for byte what the Python encoder writes (a test checks it on random lists); anything else it
 * declines (returns None) and the Python encoder, which also says what is wrong, does the list.
 *
 * Layout per entry follows rsync's flist.c send_file_entry; the integers io.c write_varint / write_varlong. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

#define XMIT_TOP_DIR (1 << 0)
#define XMIT_SAME_MODE (1 << 1)
#define XMIT_EXTENDED_FLAGS (1 << 2)
#define XMIT_SAME_UID (1 << 3)
#define XMIT_SAME_GID (1 << 4)
#define XMIT_SAME_NAME (1 << 5)
#define XMIT_LONG_NAME (1 << 6)
#define XMIT_SAME_TIME (1 << 7)
#define XMIT_NO_CONTENT_DIR (1 << 8)
#define XMIT_MOD_NSEC (1 << 13)

#define PATH_MAX_ 4096
#define NAME_MAX_ 255

typedef struct {
    unsigned char *p;
    size_t len, cap;
} buf_t;

static int grow(buf_t *b, size_t more)
{
    if (b->len + more <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more)
        cap *= 2;
    unsigned char *p = PyMem_Realloc(b->p, cap);
    if (!p) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

/* io.c write_varint: a lead byte whose high bits count the bytes that follow */
static void put_varint(buf_t *b, uint32_t x)
{
    unsigned char v[6];
    int cnt = 4;
    v[0] = 0;
    for (int i = 0; i < 4; i++)
        v[1 + i] = (unsigned char)(x >> (8 * i));
    while (cnt > 1 && v[cnt] == 0)
        cnt--;
    unsigned bit = 1u << (8 - cnt);
    if (v[cnt] >= bit) {
        cnt++;
        v[0] = (unsigned char)~(bit - 1);
    } else if (cnt > 1) {
        v[0] = (unsigned char)(v[cnt] | ~(bit * 2 - 1));
    } else {
        v[0] = v[1];
    }
    memcpy(b->p + b->len, v, (size_t)cnt);
    b->len += (size_t)cnt;
}

/* io.c write_varlong: the low min_bytes - 1 bytes verbatim after a lead byte */
static void put_varlong(buf_t *b, uint64_t x, int min_bytes)
{
    unsigned char v[10];
    int cnt = 8;
    v[0] = 0;
    for (int i = 0; i < 8; i++)
        v[1 + i] = (unsigned char)(x >> (8 * i));
    while (cnt > min_bytes && v[cnt] == 0)
        cnt--;
    unsigned bit = 1u << (7 - cnt + min_bytes);
    if (v[cnt] >= bit) {
        cnt++;
        v[0] = (unsigned char)~(bit - 1);
    } else if (cnt > min_bytes) {
        v[0] = (unsigned char)(v[cnt] | ~(bit * 2 - 1));
    } else {
        v[0] = v[cnt];
    }
    memcpy(b->p + b->len, v, (size_t)cnt);
    b->len += (size_t)cnt;
}

/* kwatch.paths.check_relpath's test ("." is the transfer root): 1 when safe */
static int safe_name(const unsigned char *s, Py_ssize_t n)
{
    if (n == 1 && s[0] == '.')
        return 1;
    if (n <= 0 || n >= PATH_MAX_ || s[0] == '/')
        return 0;
    Py_ssize_t start = 0;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (i < n && s[i] == 0)
            return 0;
        if (i == n || s[i] == '/') {
            Py_ssize_t len = i - start;
            if (len == 0 || len > NAME_MAX_)
                return 0;
            if (s[start] == '.' && (len == 1 || (len == 2 && s[start + 1] == '.')))
                return 0;
            start = i + 1;
        }
    }
    return 1;
}

static PyObject *s_name, *s_mode, *s_size, *s_mtime, *s_mtime_nsec, *s_link_target, *s_top_dir, *s_content_dir,
    *s_inode;

static int get_ll(PyObject *o, PyObject *attr, long long *out)
{
    PyObject *v = PyObject_GetAttr(o, attr);
    if (!v)
        return -1;
    *out = PyLong_AsLongLong(v);
    Py_DECREF(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int get_bool(PyObject *o, PyObject *attr, int *out)
{
    PyObject *v = PyObject_GetAttr(o, attr);
    if (!v)
        return -1;
    *out = PyObject_IsTrue(v);
    Py_DECREF(v);
    return *out < 0 ? -1 : 0;
}

/* encode(entries, protocol) -> bytes, or None for a list this encoder does not do */
static PyObject *encode(PyObject *self, PyObject *args)
{
    PyObject *entries;
    int protocol;
    if (!PyArg_ParseTuple(args, "O!i", &PyList_Type, &entries, &protocol))
        return NULL;
    if (protocol < 30)
        Py_RETURN_NONE;
    buf_t b = {0};
    unsigned char last[PATH_MAX_];
    Py_ssize_t last_len = 0;
    long long prev_mode = -1, prev_mtime = 0;
    int have_mtime = 0;
    Py_ssize_t count = PyList_GET_SIZE(entries);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *e = PyList_GET_ITEM(entries, i);
        PyObject *name = NULL, *target = NULL, *inode = NULL;
        long long mode, size, mtime, nsec;
        int top_dir, content_dir;
        if (get_ll(e, s_mode, &mode) || get_ll(e, s_size, &size) || get_ll(e, s_mtime, &mtime) ||
            get_ll(e, s_mtime_nsec, &nsec) || get_bool(e, s_top_dir, &top_dir) ||
            get_bool(e, s_content_dir, &content_dir))
            goto fail;
        name = PyObject_GetAttr(e, s_name);
        target = name ? PyObject_GetAttr(e, s_link_target) : NULL;
        inode = target ? PyObject_GetAttr(e, s_inode) : NULL;
        if (!inode)
            goto fail_refs;
        int is_dir = S_ISDIR(mode), is_link = S_ISLNK(mode);
        if (!PyBytes_Check(name) || (target != Py_None && !PyBytes_Check(target)) || inode != Py_None ||
            (mode != 0 && !(S_ISREG(mode) || is_dir || is_link)) || mode < 0 || mode > 0x7FFFFFFF || size < 0 ||
            nsec < 0 || nsec >= 1000000000)
            goto decline;
        const unsigned char *nm = (const unsigned char *)PyBytes_AS_STRING(name);
        Py_ssize_t nlen = PyBytes_GET_SIZE(name);
        if (!safe_name(nm, nlen))
            goto decline;
        Py_ssize_t tlen = 0;
        const char *tg = NULL;
        if (is_link && target != Py_None) {
            tg = PyBytes_AS_STRING(target);
            tlen = PyBytes_GET_SIZE(target);
        }
        unsigned xflags = 0;
        if (is_dir) {
            if (top_dir && !content_dir)
                xflags = XMIT_TOP_DIR | XMIT_NO_CONTENT_DIR;
            else if (!content_dir)
                xflags = XMIT_NO_CONTENT_DIR;
            else if (top_dir)
                xflags = XMIT_TOP_DIR;
        }
        if (mode == prev_mode)
            xflags |= XMIT_SAME_MODE;
        else
            prev_mode = mode;
        xflags |= XMIT_SAME_UID | XMIT_SAME_GID;
        if (have_mtime && mtime == prev_mtime)
            xflags |= XMIT_SAME_TIME;
        else {
            prev_mtime = mtime;
            have_mtime = 1;
        }
        if (nsec && protocol >= 31)
            xflags |= XMIT_MOD_NSEC;
        Py_ssize_t l1 = 0;
        while (l1 < last_len && l1 < nlen && l1 < 255 && nm[l1] == last[l1])
            l1++;
        Py_ssize_t l2 = nlen - l1;
        if (l1 > 0)
            xflags |= XMIT_SAME_NAME;
        if (l2 > 255)
            xflags |= XMIT_LONG_NAME;
        if (grow(&b, 64 + (size_t)l2 + (size_t)tlen))
            goto fail_refs;
        put_varint(&b, xflags ? xflags : XMIT_EXTENDED_FLAGS);
        if (xflags & XMIT_SAME_NAME)
            b.p[b.len++] = (unsigned char)l1;
        if (xflags & XMIT_LONG_NAME)
            put_varint(&b, (uint32_t)l2);
        else
            b.p[b.len++] = (unsigned char)l2;
        memcpy(b.p + b.len, nm + l1, (size_t)l2);
        b.len += (size_t)l2;
        put_varlong(&b, (uint64_t)size, 3);
        if (!(xflags & XMIT_SAME_TIME))
            put_varlong(&b, (uint64_t)mtime, 4);
        if (xflags & XMIT_MOD_NSEC)
            put_varint(&b, (uint32_t)nsec);
        if (!(xflags & XMIT_SAME_MODE)) {
            uint32_t m = (uint32_t)mode;
            for (int k = 0; k < 4; k++)
                b.p[b.len++] = (unsigned char)(m >> (8 * k));
        }
        if (is_link) {
            put_varint(&b, (uint32_t)tlen);
            memcpy(b.p + b.len, tg, (size_t)tlen);
            b.len += (size_t)tlen;
        }
        memcpy(last, nm, (size_t)nlen);
        last_len = nlen;
        Py_DECREF(name);
        Py_DECREF(target);
        Py_DECREF(inode);
        continue;
    decline:
        Py_DECREF(name);
        Py_DECREF(target);
        Py_DECREF(inode);
        PyMem_Free(b.p);
        Py_RETURN_NONE;
    fail_refs:
        Py_XDECREF(name);
        Py_XDECREF(target);
        Py_XDECREF(inode);
        goto fail;
    }
    PyObject *out = PyBytes_FromStringAndSize((const char *)b.p, (Py_ssize_t)b.len);
    PyMem_Free(b.p);
    return out;
fail:
    PyMem_Free(b.p);
    return NULL;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS,
     "encode(entries, protocol) -> bytes: the entries of a file list as FlistEncoder writes them (protocol >= 30, "
     "varint flags, no hard links), or None for a list it does not do"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_flistc", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__flistc(void)
{
#define INTERN(v, s)                                                                                                   \
    if (!(v = PyUnicode_InternFromString(s)))                                                                          \
        return NULL;
    INTERN(s_name, "name");
    INTERN(s_mode, "mode");
    INTERN(s_size, "size");
    INTERN(s_mtime, "mtime");
    INTERN(s_mtime_nsec, "mtime_nsec");
    INTERN(s_link_target, "link_target");
    INTERN(s_top_dir, "top_dir");
    INTERN(s_content_dir, "content_dir");
    INTERN(s_inode, "inode");
    return PyModule_Create(&module);
}
