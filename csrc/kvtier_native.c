/* kvtier._kvtier_native: the Python binding of kvtier's native core.
 *
 * Every argument is checked (pyargs.c: type, dtype, dimensions, contiguity,
 * matching lengths, null or wrapping spans) before any byte moves, and the work
 * itself runs with the GIL released. kvtier/_native.py is the only importer;
 * kvtier/_reference.py holds the same ops in Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "copy.h"
#include "crc32c.h"
#include "pool.h"
#include "pyargs.h"
#include "ranges.h"
#include "spans.h"

#define DEFAULT_THREADS_CAP 8
/* Smaller copies and checksums keep the GIL: they finish in a few microseconds,
 * less than it can take to get the GIL back from another thread. */
#define GIL_RELEASE_BYTES (64 * 1024)

static int default_threads = 1;

static PyObject *new_result(Py_ssize_t n, Py_ssize_t itemsize)
{
    return PyByteArray_FromStringAndSize(NULL, n * itemsize);
}

/* ---- copy_spans / memcpy ----------------------------------------------- */

/* The checked arguments of the span copies. */
struct copy_args {
    Py_buffer src, dst, len;
    const uint64_t *s, *d, *l;
    size_t n;
    int threads;
    uint64_t total; /* bytes over all spans */
};

static void release_copy_args(struct copy_args *a)
{
    PyBuffer_Release(&a->len);
    PyBuffer_Release(&a->dst);
    PyBuffer_Release(&a->src);
}

/* Parses and checks (src_addrs, dst_addrs, lengths, threads): equal lengths, no
 * null or wrapping span, no span overlapping itself. On success the caller
 * releases `a`; on failure nothing is held. */
static int parse_copy_args(PyObject *args, PyObject *kw, const char *fmt, struct copy_args *a)
{
    static char *kwlist[] = {"src_addrs", "dst_addrs", "lengths", "threads", NULL};
    PyObject *osrc, *odst, *olen, *othreads = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &osrc, &odst, &olen, &othreads))
        return -1;
    if (kv_parse_threads(othreads, default_threads, &a->threads) < 0)
        return -1;
    if (kv_get_array(osrc, "src_addrs", "uint64", KV_U64, &a->src) < 0)
        return -1;
    if (kv_get_array(odst, "dst_addrs", "uint64", KV_U64, &a->dst) < 0) {
        PyBuffer_Release(&a->src);
        return -1;
    }
    if (kv_get_array(olen, "lengths", "uint64", KV_U64, &a->len) < 0) {
        PyBuffer_Release(&a->dst);
        PyBuffer_Release(&a->src);
        return -1;
    }
    if (kv_same_length("src_addrs", &a->src, "dst_addrs", &a->dst) < 0 ||
        kv_same_length("src_addrs", &a->src, "lengths", &a->len) < 0)
        goto fail;
    const uint64_t *s = a->s = a->src.buf, *d = a->d = a->dst.buf, *l = a->l = a->len.buf;
    a->n = (size_t)kv_count(&a->src);
    a->total = 0;
    for (size_t i = 0; i < a->n; i++) {
        a->total += l[i];
        if (kv_check_span("src_addrs", (Py_ssize_t)i, s[i], l[i]) < 0 ||
            kv_check_span("dst_addrs", (Py_ssize_t)i, d[i], l[i]) < 0)
            goto fail;
        if (l[i] && s[i] < d[i] + l[i] && d[i] < s[i] + l[i]) {
            PyErr_Format(PyExc_ValueError, "span %zu: source and destination overlap", i);
            goto fail;
        }
    }
    return 0;
fail:
    release_copy_args(a);
    return -1;
}

static PyObject *py_copy_spans(PyObject *self, PyObject *args, PyObject *kw)
{
    struct copy_args a;
    int rc;
    if (parse_copy_args(args, kw, "OOO|O:copy_spans", &a) < 0)
        return NULL;
    if (a.total < GIL_RELEASE_BYTES) {
        rc = kv_copy_spans(a.s, a.d, a.l, a.n, a.threads);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = kv_copy_spans(a.s, a.d, a.l, a.n, a.threads);
        Py_END_ALLOW_THREADS
    }
    release_copy_args(&a);
    if (rc)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_memcpy(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"dst", "src", "threads", NULL};
    PyObject *odst, *osrc, *othreads = Py_None;
    Py_buffer dst, src;
    int threads, rc = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:memcpy", kwlist, &odst, &osrc, &othreads))
        return NULL;
    if (kv_parse_threads(othreads, default_threads, &threads) < 0)
        return NULL;
    if (kv_get_bytes(odst, "dst", 1, &dst) < 0)
        return NULL;
    if (kv_get_bytes(osrc, "src", 0, &src) < 0) {
        PyBuffer_Release(&dst);
        return NULL;
    }
    uint64_t d = (uintptr_t)dst.buf, s = (uintptr_t)src.buf, n = (uint64_t)dst.len;
    if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "dst has %zd bytes but src has %zd bytes", dst.len,
                     src.len);
        rc = -1;
    } else if (n && s < d + n && d < s + n) {
        PyErr_SetString(PyExc_ValueError, "dst and src overlap");
        rc = -1;
    } else if (n < GIL_RELEASE_BYTES) {
        memcpy(dst.buf, src.buf, (size_t)n);
    } else {
        Py_BEGIN_ALLOW_THREADS
        rc = kv_copy_spans(&s, &d, &n, 1, threads);
        Py_END_ALLOW_THREADS
        if (rc)
            PyErr_NoMemory();
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    if (rc)
        return NULL;
    Py_RETURN_NONE;
}

/* ---- CRC32C -------------------------------------------------------------- */

static PyObject *crc_common(PyObject *args, PyObject *kw, const char *fmt, int software)
{
    static char *kwlist[] = {"buf", "value", NULL};
    PyObject *obuf, *ovalue = NULL;
    Py_buffer buf;
    uint32_t value = 0, reg;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &obuf, &ovalue))
        return NULL;
    if (ovalue && kv_parse_crc_value(ovalue, &value) < 0)
        return NULL;
    if (kv_get_bytes(obuf, "buf", 0, &buf) < 0)
        return NULL;
    reg = ~value;
    if (buf.len >= GIL_RELEASE_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        reg = software ? kv_crc32c_update_sw(reg, buf.buf, (size_t)buf.len)
                       : kv_crc32c_update(reg, buf.buf, (size_t)buf.len);
        Py_END_ALLOW_THREADS
    } else {
        reg = software ? kv_crc32c_update_sw(reg, buf.buf, (size_t)buf.len)
                       : kv_crc32c_update(reg, buf.buf, (size_t)buf.len);
    }
    PyBuffer_Release(&buf);
    return PyLong_FromUnsignedLong(~reg);
}

static PyObject *py_crc32c(PyObject *self, PyObject *args, PyObject *kw)
{
    return crc_common(args, kw, "O|O:crc32c", 0);
}

static PyObject *py_crc32c_table(PyObject *self, PyObject *args, PyObject *kw)
{
    return crc_common(args, kw, "O|O:_crc32c_table", 1);
}

static PyObject *py_crc32c_spans(PyObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"addrs", "lengths", "threads", NULL};
    PyObject *oaddr, *olen, *othreads = Py_None, *result = NULL;
    Py_buffer addr, len;
    int threads;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OO|O:crc32c_spans", kwlist, &oaddr, &olen,
                                     &othreads))
        return NULL;
    if (kv_parse_threads(othreads, default_threads, &threads) < 0)
        return NULL;
    if (kv_get_array(oaddr, "addrs", "uint64", KV_U64, &addr) < 0)
        return NULL;
    if (kv_get_array(olen, "lengths", "uint64", KV_U64, &len) < 0)
        goto done_addr;
    if (kv_same_length("addrs", &addr, "lengths", &len) < 0)
        goto done;
    const uint64_t *a = addr.buf, *l = len.buf;
    Py_ssize_t n = kv_count(&addr);
    uint64_t total = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        total += l[i];
        if (kv_check_span("addrs", i, a[i], l[i]) < 0)
            goto done;
    }
    result = new_result(n, sizeof(uint32_t));
    if (!result)
        goto done;
    uint32_t *out = (uint32_t *)PyByteArray_AS_STRING(result);
    if (total < GIL_RELEASE_BYTES) {
        kv_crc32c_spans(a, l, out, (size_t)n, threads);
    } else {
        Py_BEGIN_ALLOW_THREADS
        kv_crc32c_spans(a, l, out, (size_t)n, threads);
        Py_END_ALLOW_THREADS
    }
done:
    PyBuffer_Release(&len);
done_addr:
    PyBuffer_Release(&addr);
    return result;
}

static PyObject *py_copy_crc_spans(PyObject *self, PyObject *args, PyObject *kw)
{
    struct copy_args a;
    int rc;
    if (parse_copy_args(args, kw, "OOO|O:copy_crc_spans", &a) < 0)
        return NULL;
    PyObject *result = new_result((Py_ssize_t)a.n, sizeof(uint32_t));
    if (result) {
        uint32_t *out = (uint32_t *)PyByteArray_AS_STRING(result);
        if (a.total < GIL_RELEASE_BYTES) {
            rc = kv_copy_crc_spans(a.s, a.d, a.l, out, a.n, a.threads);
        } else {
            Py_BEGIN_ALLOW_THREADS
            rc = kv_copy_crc_spans(a.s, a.d, a.l, out, a.n, a.threads);
            Py_END_ALLOW_THREADS
        }
        if (rc) {
            Py_CLEAR(result);
            PyErr_NoMemory();
        }
    }
    release_copy_args(&a);
    return result;
}

/* ---- pread_spans / pwrite_spans ------------------------------------------- */

/* fds: one int (returns 0, *one_fd set) or an int32/int64 array (returns 1, *fds
 * filled); -1 with an exception set otherwise. */
static int parse_fds(PyObject *ofds, Py_buffer *fds, int *one_fd)
{
    if (PyLong_Check(ofds) && !PyBool_Check(ofds)) {
        long v = PyLong_AsLong(ofds);
        if ((v == -1 && PyErr_Occurred()) || v < INT32_MIN || v > INT32_MAX) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "fds must be a file descriptor, got %R", ofds);
            return -1;
        }
        *one_fd = (int)v;
        return 0;
    }
    return kv_get_array(ofds, "fds", "int32 or int64", KV_FDS, fds) < 0 ? -1 : 1;
}

static PyObject *io_common(PyObject *args, PyObject *kw, int write, const char *fmt)
{
    static char *kwlist[] = {"fds", "offsets", "addrs", "lengths", "threads", NULL};
    PyObject *ofds, *ooff, *oaddr, *olen, *othreads = Py_None, *result = NULL;
    Py_buffer fds = {0}, off, addr, len;
    int threads, one_fd = -1, fd_scalar = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &ofds, &ooff, &oaddr, &olen,
                                     &othreads))
        return NULL;
    if (kv_parse_threads(othreads, default_threads, &threads) < 0)
        return NULL;
    int have_fds = parse_fds(ofds, &fds, &one_fd);
    if (have_fds < 0)
        return NULL;
    fd_scalar = !have_fds;
    if (kv_get_array(ooff, "offsets", "int64 or uint64", KV_OFFSETS, &off) < 0)
        goto done_fds;
    if (kv_get_array(oaddr, "addrs", "uint64", KV_U64, &addr) < 0)
        goto done_off;
    if (kv_get_array(olen, "lengths", "uint64", KV_U64, &len) < 0)
        goto done_addr;
    if ((!fd_scalar && kv_same_length("fds", &fds, "addrs", &addr) < 0) ||
        kv_same_length("offsets", &off, "addrs", &addr) < 0 ||
        kv_same_length("addrs", &addr, "lengths", &len) < 0)
        goto done;
    Py_ssize_t n = kv_count(&addr);
    const uint64_t *a = addr.buf, *l = len.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (kv_check_span("addrs", i, a[i], l[i]) < 0)
            goto done;
    struct kv_io *reqs = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(struct kv_io));
    if (!reqs) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (fd_scalar)
            reqs[i].fd = one_fd;
        else if (fds.itemsize == 4)
            reqs[i].fd = ((const int32_t *)fds.buf)[i];
        else {
            int64_t v = ((const int64_t *)fds.buf)[i];
            reqs[i].fd = v < INT32_MIN || v > INT32_MAX ? -1 : (int)v; /* -1: EBADF */
        }
        uint64_t o = ((const uint64_t *)off.buf)[i];
        /* uint64 offsets past INT64_MAX read as negative: EINVAL per span */
        reqs[i].offset = (int64_t)o;
        reqs[i].addr = a[i];
        reqs[i].len = l[i];
        reqs[i].result = 0;
    }
    Py_BEGIN_ALLOW_THREADS
    kv_io_spans(write, reqs, (size_t)n, threads);
    Py_END_ALLOW_THREADS
    result = new_result(n, sizeof(int64_t));
    if (result) {
        int64_t *out = (int64_t *)PyByteArray_AS_STRING(result);
        for (Py_ssize_t i = 0; i < n; i++)
            out[i] = reqs[i].result;
    }
    PyMem_RawFree(reqs);
done:
    PyBuffer_Release(&len);
done_addr:
    PyBuffer_Release(&addr);
done_off:
    PyBuffer_Release(&off);
done_fds:
    if (!fd_scalar)
        PyBuffer_Release(&fds);
    return result;
}

static PyObject *py_pread_spans(PyObject *self, PyObject *args, PyObject *kw)
{
    return io_common(args, kw, 0, "OOOO|O:pread_spans");
}

static PyObject *py_pwrite_spans(PyObject *self, PyObject *args, PyObject *kw)
{
    return io_common(args, kw, 1, "OOOO|O:pwrite_spans");
}

/* ---- pread_blocks / pwrite_blocks ---------------------------------------- */

static PyObject *blocks_common(PyObject *args, PyObject *kw, int write, const char *fmt)
{
    static char *kwlist[] = {"fds", "offsets", "addrs", "block_len", "chunk_len", "piece_len",
                             "threads", NULL};
    PyObject *ofds, *ooff, *oaddr, *oblock, *ochunk, *opiece = NULL, *othreads = Py_None;
    PyObject *result = NULL;
    uint64_t block_len, chunk_len, piece_len = 0;
    Py_buffer fds = {0}, off, addr;
    int threads, one_fd = -1, have_fds;
    if (!PyArg_ParseTupleAndKeywords(args, kw, fmt, kwlist, &ofds, &ooff, &oaddr, &oblock,
                                     &ochunk, &opiece, &othreads))
        return NULL;
    if (kv_parse_threads(othreads, default_threads, &threads) < 0)
        return NULL;
    if (kv_parse_length(oblock, "block_len", &block_len) < 0 ||
        kv_parse_length(ochunk, "chunk_len", &chunk_len) < 0 ||
        (opiece && kv_parse_length(opiece, "piece_len", &piece_len) < 0))
        return NULL;
    if (block_len == 0 || chunk_len == 0) {
        PyErr_Format(PyExc_ValueError, "block_len and chunk_len must be positive, got %llu and %llu",
                     (unsigned long long)block_len, (unsigned long long)chunk_len);
        return NULL;
    }
    if (piece_len && piece_len < block_len && piece_len % chunk_len && chunk_len % piece_len) {
        PyErr_Format(PyExc_ValueError,
                     "piece_len must divide chunk_len (%llu) or be a multiple of it, got %llu",
                     (unsigned long long)chunk_len, (unsigned long long)piece_len);
        return NULL;
    }
    if ((have_fds = parse_fds(ofds, &fds, &one_fd)) < 0)
        return NULL;
    if (kv_get_array(ooff, "offsets", "int64 or uint64", KV_OFFSETS, &off) < 0)
        goto done_fds;
    if (kv_get_array(oaddr, "addrs", "uint64", KV_U64, &addr) < 0)
        goto done_off;
    if ((have_fds && kv_same_length("fds", &fds, "addrs", &addr) < 0) ||
        kv_same_length("offsets", &off, "addrs", &addr) < 0)
        goto done;
    Py_ssize_t n = kv_count(&addr);
    const uint64_t *a = addr.buf;
    for (Py_ssize_t i = 0; i < n; i++)
        if (kv_check_span("addrs", i, a[i], block_len) < 0)
            goto done;
    int *fd = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(int));
    int64_t *offsets = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(int64_t));
    PyObject *res = new_result(n, sizeof(int64_t)), *crcs = new_result(n, sizeof(uint32_t));
    if (!fd || !offsets || !res || !crcs) {
        if (!res || !crcs)
            PyErr_Clear();
        PyErr_NoMemory();
        goto free_all;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!have_fds)
            fd[i] = one_fd;
        else if (fds.itemsize == 4)
            fd[i] = ((const int32_t *)fds.buf)[i];
        else {
            int64_t v = ((const int64_t *)fds.buf)[i];
            fd[i] = v < INT32_MIN || v > INT32_MAX ? -1 : (int)v; /* -1: EBADF */
        }
        offsets[i] = (int64_t)((const uint64_t *)off.buf)[i]; /* past INT64_MAX: EINVAL */
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = kv_io_blocks(write, fd, offsets, a, (size_t)n, block_len, chunk_len, piece_len,
                      (int64_t *)PyByteArray_AS_STRING(res),
                      (uint32_t *)PyByteArray_AS_STRING(crcs), threads);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto free_all;
    }
    result = PyTuple_Pack(2, res, crcs);
free_all:
    Py_XDECREF(res);
    Py_XDECREF(crcs);
    PyMem_RawFree(fd);
    PyMem_RawFree(offsets);
done:
    PyBuffer_Release(&addr);
done_off:
    PyBuffer_Release(&off);
done_fds:
    if (have_fds)
        PyBuffer_Release(&fds);
    return result;
}

static PyObject *py_pread_blocks(PyObject *self, PyObject *args, PyObject *kw)
{
    return blocks_common(args, kw, 0, "OOOOO|OO:pread_blocks");
}

static PyObject *py_pwrite_blocks(PyObject *self, PyObject *args, PyObject *kw)
{
    return blocks_common(args, kw, 1, "OOOOO|OO:pwrite_blocks");
}

static PyObject *py_pool_workers(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(kv_pool_num_workers());
}

static PyObject *py_set_streaming(PyObject *self, PyObject *arg)
{
    int enabled = PyObject_IsTrue(arg);
    if (enabled < 0)
        return NULL;
    kv_copy_set_streaming(enabled);
    return PyBool_FromLong(kv_copy_streaming());
}

/* ---- module ---------------------------------------------------------------- */

#define KW (PyCFunction)(void (*)(void))
static PyMethodDef methods[] = {
    {"copy_spans", KW py_copy_spans, METH_VARARGS | METH_KEYWORDS,
     "copy_spans(src_addrs, dst_addrs, lengths, threads=None) -> None"},
    {"memcpy", KW py_memcpy, METH_VARARGS | METH_KEYWORDS,
     "memcpy(dst, src, threads=None) -> None"},
    {"crc32c", KW py_crc32c, METH_VARARGS | METH_KEYWORDS,
     "crc32c(buf, value=0) -> int (fastest implementation)"},
    {"_crc32c_table", KW py_crc32c_table, METH_VARARGS | METH_KEYWORDS,
     "_crc32c_table(buf, value=0) -> int (portable table implementation)"},
    {"copy_crc_spans", KW py_copy_crc_spans, METH_VARARGS | METH_KEYWORDS,
     "copy_crc_spans(src_addrs, dst_addrs, lengths, threads=None) -> bytearray of uint32"},
    {"crc32c_spans", KW py_crc32c_spans, METH_VARARGS | METH_KEYWORDS,
     "crc32c_spans(addrs, lengths, threads=None) -> bytearray of uint32"},
    {"pread_spans", KW py_pread_spans, METH_VARARGS | METH_KEYWORDS,
     "pread_spans(fds, offsets, addrs, lengths, threads=None) -> bytearray of int64"},
    {"pwrite_spans", KW py_pwrite_spans, METH_VARARGS | METH_KEYWORDS,
     "pwrite_spans(fds, offsets, addrs, lengths, threads=None) -> bytearray of int64"},
    {"pread_blocks", KW py_pread_blocks, METH_VARARGS | METH_KEYWORDS,
     "pread_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None)"
     " -> (bytearray of int64, bytearray of uint32)"},
    {"pwrite_blocks", KW py_pwrite_blocks, METH_VARARGS | METH_KEYWORDS,
     "pwrite_blocks(fds, offsets, addrs, block_len, chunk_len, piece_len=0, threads=None)"
     " -> (bytearray of int64, bytearray of uint32)"},
    {"_first_outside", kv_py_first_outside, METH_VARARGS,
     "_first_outside(starts, ends0, addrs, lengths) -> index of the first span outside every range, or -1"},
    {"_pool_workers", py_pool_workers, METH_NOARGS,
     "_pool_workers() -> number of worker threads started so far"},
    {"_set_streaming", py_set_streaming, METH_O,
     "_set_streaming(enabled) -> bool: use streaming stores for big copies (benchmarks)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvtier._kvtier_native",
    "kvtier's native core: batched copies, CRC32C and positional I/O on a thread pool.", -1,
    methods,
};

PyMODINIT_FUNC PyInit__kvtier_native(void)
{
    kv_crc32c_init();
    kv_copy_init();
    int cpus = kv_num_cpus();
    default_threads = cpus < DEFAULT_THREADS_CAP ? cpus : DEFAULT_THREADS_CAP;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddObject(m, "HARDWARE_CRC", PyBool_FromLong(kv_crc32c_hardware())) < 0 ||
        PyModule_AddIntConstant(m, "DEFAULT_THREADS", default_threads) < 0 ||
        PyModule_AddIntConstant(m, "MAX_THREADS", KV_POOL_MAX_THREADS) < 0 ||
        PyModule_AddIntConstant(m, "INLINE_BYTES", KV_INLINE_BYTES) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
