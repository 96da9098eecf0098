/* guestmem._rangemap's C API: how compiled code reads and edits a RangeMap in the compiled layout
 * without a Python call.  The capsule guestmem._rangemap._C_API holds a pointer to one of these;
 * guestmem/_rangemap.c documents each function (and defines them), the model's accelerators
 * (guestmem/model/_fastconv.c, guestmem/model/kvm/_fastfault.c) use it.  Check ``abi`` first. */
#ifndef GUESTMEM_RANGEMAP_CAPI_H
#define GUESTMEM_RANGEMAP_CAPI_H

#include <Python.h>
#include <stdint.h>

#define GUESTMEM_RANGEMAP_CAPI_ABI 1

typedef struct {
    int abi; /* GUESTMEM_RANGEMAP_CAPI_ABI */
    int (*is_native)(PyObject *map);
    PyObject *(*get)(PyObject *map, int64_t index);
    int (*set)(PyObject *map, int64_t start, int64_t end, PyObject *value);
    Py_ssize_t (*length)(PyObject *map);
    PyObject *(*piece)(PyObject *map, int64_t index, int64_t *start, int64_t *end);
    int (*set_with_eq)(PyObject *map, int64_t start, int64_t end, PyObject *value,
                       int (*eq)(PyObject *a, PyObject *b));
} RangeMapCAPI;

#endif
