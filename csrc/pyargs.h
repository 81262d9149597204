/* Argument checks shared by the bindings in kvtier_native.c. */
#ifndef KVTIER_PYARGS_H
#define KVTIER_PYARGS_H

#include <Python.h>
#include <stdint.h>

enum kv_dtype_kind { KV_UNSIGNED, KV_SIGNED, KV_OTHER };

struct kv_dtype {
    enum kv_dtype_kind kind;
    Py_ssize_t itemsize; /* 0 ends a list of allowed dtypes */
};

extern const struct kv_dtype KV_U64[];     /* uint64 */
extern const struct kv_dtype KV_OFFSETS[]; /* int64 or uint64 */
extern const struct kv_dtype KV_FDS[];     /* int32 or int64 */

/* A 1-D C-contiguous array of one of the `allowed` dtypes (`wanted` names them
 * in errors). On success the caller owns `view` and releases it. */
int kv_get_array(PyObject *obj, const char *name, const char *wanted,
                 const struct kv_dtype *allowed, Py_buffer *view);

/* A C-contiguous buffer of any format, looked at as bytes. */
int kv_get_bytes(PyObject *obj, const char *name, int writable, Py_buffer *view);

Py_ssize_t kv_count(const Py_buffer *view);
int kv_same_length(const char *a, const Py_buffer *va, const char *b, const Py_buffer *vb);

/* A span must not start at NULL or run past the end of the address space. */
int kv_check_span(const char *name, Py_ssize_t i, uint64_t addr, uint64_t len);

/* None -> default_threads; a positive int, capped at KV_POOL_MAX_THREADS. */
int kv_parse_threads(PyObject *obj, int default_threads, int *threads);

/* A length: an int (not a bool) in [0, 2**64); a negative one is a ValueError
 * naming `name`. */
int kv_parse_length(PyObject *obj, const char *name, uint64_t *value);

/* A CRC value in [0, 2**32). */
int kv_parse_crc_value(PyObject *obj, uint32_t *value);

#endif
