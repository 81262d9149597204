/* The span check behind kvtier.native.ranges: is every span inside a registered range? */
#ifndef KVTIER_RANGES_H
#define KVTIER_RANGES_H

#include <Python.h>

/* _first_outside(starts, ends0, addrs, lengths) -> int
 *
 * starts: sorted uint64 range starts; ends0: uint64, 0 then the end of each
 * range (a running maximum where ranges overlap); addrs: uint64 span starts;
 * lengths: a uint64 array like addrs, or one int for every span. Returns the
 * index of the first non-empty span that lies inside no range, or -1. Null,
 * wrapping and oversized spans count as inside: the ops refuse those
 * themselves before any byte moves. Arguments of another shape raise. */
PyObject *kv_py_first_outside(PyObject *self, PyObject *args);

#endif
