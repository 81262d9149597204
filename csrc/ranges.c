/* The span check behind kvtier.native.ranges: one binary search per span over
 * the registered ranges, so checking a batch costs far less than copying it.
 */
#define PY_SSIZE_T_CLEAN
#include "ranges.h"

#include <stdint.h>

#include "pyargs.h"

static Py_ssize_t first_outside(const uint64_t *starts, const uint64_t *ends0, Py_ssize_t nranges,
                                const uint64_t *addrs, const uint64_t *lens, uint64_t one_len,
                                Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t a = addrs[i], len = lens ? lens[i] : one_len;
        if (len == 0 || a == 0 || len > UINT64_MAX - a || len > (uint64_t)INT64_MAX)
            continue;                              /* empty, or refused by the op itself */
        Py_ssize_t lo = 0, hi = nranges;           /* count of starts <= a */
        while (lo < hi) {
            Py_ssize_t mid = lo + (hi - lo) / 2;
            if (starts[mid] <= a)
                lo = mid + 1;
            else
                hi = mid;
        }
        uint64_t end = ends0[lo];                  /* 0 below the first range */
        if (!(a < end && len <= end - a))
            return i;
    }
    return -1;
}

PyObject *kv_py_first_outside(PyObject *self, PyObject *args)
{
    PyObject *ostarts, *oends, *oaddrs, *olens;
    Py_buffer starts, ends, addrs, lens = {0};
    uint64_t one_len = 0;
    int have_lens = 0;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOO:_first_outside", &ostarts, &oends, &oaddrs, &olens))
        return NULL;
    if (kv_get_array(ostarts, "starts", "uint64", KV_U64, &starts) < 0)
        return NULL;
    if (kv_get_array(oends, "ends0", "uint64", KV_U64, &ends) < 0)
        goto done_starts;
    if (kv_get_array(oaddrs, "addrs", "uint64", KV_U64, &addrs) < 0)
        goto done_ends;
    if (PyLong_Check(olens)) {
        if (kv_parse_length(olens, "lengths", &one_len) < 0)
            goto done_addrs;
    } else {
        if (kv_get_array(olens, "lengths", "uint64", KV_U64, &lens) < 0)
            goto done_addrs;
        have_lens = 1;
        if (kv_same_length("addrs", &addrs, "lengths", &lens) < 0)
            goto done;
    }
    if (kv_count(&ends) != kv_count(&starts) + 1) {
        PyErr_SetString(PyExc_ValueError, "ends0 must have one more item than starts");
        goto done;
    }
    result = PyLong_FromSsize_t(first_outside(starts.buf, ends.buf, kv_count(&starts), addrs.buf,
                                              have_lens ? lens.buf : NULL, one_len, kv_count(&addrs)));
done:
    if (have_lens)
        PyBuffer_Release(&lens);
done_addrs:
    PyBuffer_Release(&addrs);
done_ends:
    PyBuffer_Release(&ends);
done_starts:
    PyBuffer_Release(&starts);
    return result;
}
