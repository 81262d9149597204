/* Checks of the Python arguments of kvtier's native ops: every array's type,
 * dtype, dimensions and contiguity, matching lengths, null or wrapping spans,
 * thread counts. Each failure sets a ValueError or TypeError that names the
 * argument, what it must be and what it was.
 */
#define PY_SSIZE_T_CLEAN
#include "pyargs.h"

#include <string.h>

#include "pool.h"

static int read_dtype(const Py_buffer *view, struct kv_dtype *dt)
{
    const char *f = view->format ? view->format : "B";
    dt->itemsize = view->itemsize;
    dt->kind = KV_OTHER;
    if (*f == '@' || *f == '=' || *f == '<')
        f++;
    if (f[0] == '\0' || f[1] != '\0')
        return -1;
    if (strchr("BHILQN", f[0]))
        dt->kind = KV_UNSIGNED;
    else if (strchr("bhilqn", f[0]))
        dt->kind = KV_SIGNED;
    return 0;
}

static void describe(const Py_buffer *view, char *out, size_t size)
{
    struct kv_dtype dt;
    if (read_dtype(view, &dt) == 0 && dt.kind != KV_OTHER)
        snprintf(out, size, "%s%d", dt.kind == KV_UNSIGNED ? "uint" : "int",
                 (int)(dt.itemsize * 8));
    else
        snprintf(out, size, "buffer format '%s'", view->format ? view->format : "B");
}

/* Accepts a 1-D C-contiguous array whose items match one of `allowed`
 * (a zero-terminated list of (kind, itemsize) pairs). */
int kv_get_array(PyObject *obj, const char *name, const char *wanted,
                 const struct kv_dtype *allowed, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_STRIDES) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a 1-D %s numpy array, got %.100s", name,
                     wanted, Py_TYPE(obj)->tp_name);
        return -1;
    }
    char got[64];
    struct kv_dtype dt;
    int ok = read_dtype(view, &dt) == 0;
    for (const struct kv_dtype *a = allowed; ok && a->itemsize; a++)
        if (a->kind == dt.kind && a->itemsize == dt.itemsize)
            goto dtype_ok;
    describe(view, got, sizeof(got));
    PyErr_Format(PyExc_ValueError, "%s must be a 1-D %s array, got dtype %s", name, wanted,
                 got);
    PyBuffer_Release(view);
    return -1;
dtype_ok:
    if (view->ndim != 1) {
        PyErr_Format(PyExc_ValueError, "%s must be a 1-D %s array, got %d dimensions", name,
                     wanted, view->ndim);
        PyBuffer_Release(view);
        return -1;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be a contiguous %s array, got a strided view "
                     "(use numpy.ascontiguousarray)",
                     name, wanted);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

const struct kv_dtype KV_U64[] = {{KV_UNSIGNED, 8}, {KV_OTHER, 0}};
const struct kv_dtype KV_OFFSETS[] = {{KV_SIGNED, 8}, {KV_UNSIGNED, 8}, {KV_OTHER, 0}};
const struct kv_dtype KV_FDS[] = {{KV_SIGNED, 4}, {KV_SIGNED, 8}, {KV_OTHER, 0}};

Py_ssize_t kv_count(const Py_buffer *view) { return view->len / view->itemsize; }

int kv_same_length(const char *a, const Py_buffer *va, const char *b, const Py_buffer *vb)
{
    if (kv_count(va) == kv_count(vb))
        return 0;
    PyErr_Format(PyExc_ValueError, "%s and %s must have the same length, got %zd and %zd", a,
                 b, kv_count(va), kv_count(vb));
    return -1;
}

/* A span must not start at NULL or run past the end of the address space. */
int kv_check_span(const char *name, Py_ssize_t i, uint64_t addr, uint64_t len)
{
    if (len == 0)
        return 0;
    if (addr == 0) {
        PyErr_Format(PyExc_ValueError, "span %zd: %s is 0 (null) for a length of %llu bytes",
                     i, name, (unsigned long long)len);
        return -1;
    }
    if (addr > UINTPTR_MAX - len || len > (uint64_t)PY_SSIZE_T_MAX) {
        /* PyErr_Format knows no %llx before Python 3.12: format here. */
        char msg[160];
        snprintf(msg, sizeof(msg), "span %zd: %s 0x%llx + %llu bytes runs past the end of memory",
                 i, name, (unsigned long long)addr, (unsigned long long)len);
        PyErr_SetString(PyExc_ValueError, msg);
        return -1;
    }
    return 0;
}

int kv_parse_threads(PyObject *obj, int default_threads, int *threads)
{
    if (obj == NULL || obj == Py_None) {
        *threads = default_threads;
        return 0;
    }
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "threads must be a positive int or None, got %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long v = PyLong_AsLongAndOverflow(obj, &overflow);
    if (overflow > 0)
        v = KV_POOL_MAX_THREADS;
    if (v < 1 || overflow < 0) {
        PyErr_Format(PyExc_ValueError, "threads must be a positive int or None, got %R", obj);
        return -1;
    }
    *threads = v > KV_POOL_MAX_THREADS ? KV_POOL_MAX_THREADS : (int)v;
    return 0;
}

/* A C-contiguous buffer of any format, looked at as bytes. */
int kv_get_bytes(PyObject *obj, const char *name, int writable, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_STRIDES) < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must support the buffer protocol, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (writable && view->readonly) {
        PyErr_Format(PyExc_ValueError, "%s is read-only (%.100s)", name, Py_TYPE(obj)->tp_name);
        PyBuffer_Release(view);
        return -1;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous", name);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* A length: an int (not a bool) in [0, 2**64). */
int kv_parse_length(PyObject *obj, const char *name, uint64_t *value)
{
    if (!PyLong_Check(obj) || PyBool_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a non-negative int, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long sv = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (sv == -1 && !overflow && PyErr_Occurred())
        return -1;
    if (overflow < 0 || (!overflow && sv < 0)) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-negative int, got %R", name, obj);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s must be below 2**64, got %R", name, obj);
        return -1;
    }
    *value = (uint64_t)v;
    return 0;
}

int kv_parse_crc_value(PyObject *obj, uint32_t *value)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "value must be an int, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if ((v == (unsigned long long)-1 && PyErr_Occurred()) || v > 0xFFFFFFFFull) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "value must be a CRC in [0, 2**32), got %R", obj);
        return -1;
    }
    *value = (uint32_t)v;
    return 0;
}
