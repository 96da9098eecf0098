/*
 * guestmem._rangemap: the compiled layout of guestmem.ranges.RangeMap, at every size.
 *
 * Why: a RangeMap of a million ranges kept as Python lists pays a cache and TLB miss for every
 * probe of a bisect (each key is its own int object somewhere on the heap): 5-9 us per random
 * single-page set on this class of machine.  Here the keys are packed int64 arrays in chunks, so a
 * lookup touches a few cache lines of one page per level and no Python objects but the value.  And
 * most maps are tiny (1-10 intervals, a dozen edits and two dozen lookups per guest fault): there
 * the cost is the Python calls themselves, so RangeMap's classes derive from Core and the compiled
 * layout's methods are the ones below, called straight from Python with no Python frame between.
 *
 * Core(default, load) holds sorted, disjoint, non-empty intervals [s, e) -> value, never holding a
 * value equal to ``default`` and never two touching intervals with equal values: exactly the
 * representation and the ``set`` rule of ranges.RangeMap's Python layouts (the fallback when this
 * is not built), including which value object a merged interval keeps and the order in which
 * values are compared with ``==``.  Chunks hold load/2 .. 2*load intervals (a small map's one chunk
 * grows from 4); ``mins`` holds each chunk's first start.  Keys must be exact ints within int64:
 * given any other key, a method calls the map's Python ``_unsupported(name, *args)`` before
 * anything changed, and ranges.py moves the map to a Python layout (or widens a query).
 * Other accelerators can read and edit a map from C through the capsule ``_C_API`` (see below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_rangemap_capi.h"
#include <structmember.h>
#include <stdint.h>
#include <string.h>

static PyObject *Unsupported;
static PyObject *str_unsupported; /* "_unsupported" */

typedef struct {
    Py_ssize_t n, cap;
    int64_t *s, *e;
    PyObject **v;
} Chunk;

typedef struct {
    PyObject_HEAD
    PyObject *deflt;
    Py_ssize_t load;
    Py_ssize_t nchunks, capchunks;
    Chunk **chunks;
    int64_t *mins;
    Py_ssize_t len;
    uint64_t version;
    /* 0 while no value ever stored here (since the map was last emptied) is of a GC type: then no
       value can be part of a reference cycle, and tp_traverse skips them.  A map of a million
       int or bool ranges otherwise costs every collection of its generation a million visits
       (~10 ns each): 30 ms for a guest's attributes and the VMM's tracker at 1M ranges. */
    int gc_values;
    /* values dropped by an edit, released once the structure is consistent again (a __del__ may
       run arbitrary code, even code that reads this map) */
    PyObject **grave;
    Py_ssize_t ngrave, capgrave;
} Core;

static PyTypeObject CoreType;
static PyTypeObject IterType;
static PyTypeObject *native_type; /* ranges._NativeRangeMap, registered by ranges.py */
static PyTypeObject *flat_type;   /* ranges.RangeMap */
static PyObject *ranges_globals;  /* ranges.py's module dict: _native, _LOAD, _NATIVE_LOAD */
static PyObject *str_native, *str_load, *str_native_load, *str_default;
/* Byte offset of RangeMap's ``default`` slot in its instances (-1 until registered): RangeMap keeps
   ``default`` as a plain __slots__ member (Python code and other accelerators read it there), and
   the core keeps it in ``deflt`` too; both are written together (new maps, copies, _reset). */
static Py_ssize_t default_offset = -1;

/* Write ``deflt`` into the RangeMap ``default`` slot too, when m is a RangeMap. */
static void sync_default_slot(Core *m) {
    if (default_offset < 0 || flat_type == NULL || !PyType_IsSubtype(Py_TYPE(m), flat_type)) return;
    PyObject **slot = (PyObject **)((char *)m + default_offset);
    Py_XSETREF(*slot, Py_NewRef(m->deflt));
}

/* --- helpers ------------------------------------------------------------------------------------ */

/* 1: *out holds the key; 0: not an exact int within int64 (Unsupported); -1: error. */
static int key64(PyObject *o, int64_t *out) {
    if (!PyLong_CheckExact(o)) return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return 0;
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = (int64_t)v;
    return 1;
}

static PyObject *unsupported(void) {
    PyErr_SetString(Unsupported, "key is not an int within int64");
    return NULL;
}

/* The C API's set_with_eq: a caller's own comparison, in C, for the values of its maps, while that
   one set runs (the GIL is held throughout and the comparison runs no Python code, so nothing else
   can see or change this). */
static int (*eq_override)(PyObject *a, PyObject *b);

/* ``a == b`` as Python evaluates it (no identity shortcut, except for types where it is exact). */
static int eq(PyObject *a, PyObject *b) {
    if (eq_override != NULL) return eq_override(a, b);
    if (a == b && (PyLong_CheckExact(a) || PyUnicode_CheckExact(a) || a == Py_None || PyBool_Check(a)))
        return 1;
    PyObject *r = PyObject_RichCompare(a, b, Py_EQ);
    if (r == NULL) return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* first index with a[i] >= x / a[i] > x */
static Py_ssize_t lower_bound(const int64_t *a, Py_ssize_t n, int64_t x) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (a[mid] < x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static Py_ssize_t upper_bound(const int64_t *a, Py_ssize_t n, int64_t x) {
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) >> 1;
        if (a[mid] <= x) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static Chunk *chunk_new(Py_ssize_t cap) {
    Chunk *ch = PyMem_Calloc(1, sizeof(Chunk));
    if (ch == NULL) return NULL;
    if (cap < 4) cap = 4;
    ch->s = PyMem_Malloc(cap * sizeof(int64_t));
    ch->e = PyMem_Malloc(cap * sizeof(int64_t));
    ch->v = PyMem_Malloc(cap * sizeof(PyObject *));
    if (ch->s == NULL || ch->e == NULL || ch->v == NULL) {
        PyMem_Free(ch->s);
        PyMem_Free(ch->e);
        PyMem_Free(ch->v);
        PyMem_Free(ch);
        return NULL;
    }
    ch->cap = cap;
    return ch;
}

/* Frees the arrays; the values' references must have been moved or released by the caller. */
static void chunk_free(Chunk *ch) {
    PyMem_Free(ch->s);
    PyMem_Free(ch->e);
    PyMem_Free(ch->v);
    PyMem_Free(ch);
}

static int chunk_reserve(Chunk *ch, Py_ssize_t need) {
    if (need <= ch->cap) return 0;
    Py_ssize_t cap = ch->cap + ch->cap / 2;
    if (cap < need) cap = need;
    int64_t *s = PyMem_Realloc(ch->s, cap * sizeof(int64_t));
    if (s == NULL) return -1;
    ch->s = s;
    int64_t *e = PyMem_Realloc(ch->e, cap * sizeof(int64_t));
    if (e == NULL) return -1;
    ch->e = e;
    PyObject **v = PyMem_Realloc(ch->v, cap * sizeof(PyObject *));
    if (v == NULL) return -1;
    ch->v = v;
    ch->cap = cap;
    return 0;
}

/* Release the values an edit dropped (may run arbitrary code: the structure is consistent). */
static void grave_empty(Core *m) {
    while (m->ngrave > 0) {
        PyObject *o = m->grave[--m->ngrave];
        Py_DECREF(o);
    }
}

/* Room for one more chunk pointer and min. */
static int chunks_reserve(Core *m, Py_ssize_t need) {
    if (need <= m->capchunks) return 0;
    Py_ssize_t cap = m->capchunks ? m->capchunks * 2 : 8;
    if (cap < need) cap = need;
    Chunk **c = PyMem_Realloc(m->chunks, cap * sizeof(Chunk *));
    if (c == NULL) return -1;
    m->chunks = c;
    int64_t *mins = PyMem_Realloc(m->mins, cap * sizeof(int64_t));
    if (mins == NULL) return -1;
    m->mins = mins;
    m->capchunks = cap;
    return 0;
}

static void chunks_remove(Core *m, Py_ssize_t c) {
    chunk_free(m->chunks[c]);
    memmove(m->chunks + c, m->chunks + c + 1, (m->nchunks - c - 1) * sizeof(Chunk *));
    memmove(m->mins + c, m->mins + c + 1, (m->nchunks - c - 1) * sizeof(int64_t));
    m->nchunks--;
}

/* Keep chunk c within load/2 .. 2*load intervals (drop it when empty) and its min right. */
static int fix(Core *m, Py_ssize_t c) {
    Chunk *ch = m->chunks[c];
    if (ch->n == 0) {
        chunks_remove(m, c);
        return 0;
    }
    m->mins[c] = ch->s[0];
    Py_ssize_t load = m->load;
    if (ch->n > 2 * load) {
        Py_ssize_t pieces = ch->n / load;
        Py_ssize_t size = (ch->n + pieces - 1) / pieces;
        Py_ssize_t extra = (ch->n - 1) / size; /* chunks after c */
        if (chunks_reserve(m, m->nchunks + extra) < 0) return -1;
        Chunk *made[64];
        Chunk **fresh = extra <= 64 ? made : PyMem_Malloc(extra * sizeof(Chunk *));
        if (fresh == NULL) return -1;
        for (Py_ssize_t k = 0; k < extra; k++) {
            fresh[k] = chunk_new(2 * load + 2);
            if (fresh[k] == NULL) {
                while (k-- > 0) chunk_free(fresh[k]);
                if (fresh != made) PyMem_Free(fresh);
                return -1;
            }
        }
        memmove(m->chunks + c + 1 + extra, m->chunks + c + 1, (m->nchunks - c - 1) * sizeof(Chunk *));
        memmove(m->mins + c + 1 + extra, m->mins + c + 1, (m->nchunks - c - 1) * sizeof(int64_t));
        for (Py_ssize_t k = 0; k < extra; k++) {
            Py_ssize_t from = size * (k + 1);
            Py_ssize_t cnt = ch->n - from < size ? ch->n - from : size;
            Chunk *nc = fresh[k];
            memcpy(nc->s, ch->s + from, cnt * sizeof(int64_t));
            memcpy(nc->e, ch->e + from, cnt * sizeof(int64_t));
            memcpy(nc->v, ch->v + from, cnt * sizeof(PyObject *));
            nc->n = cnt;
            m->chunks[c + 1 + k] = nc;
            m->mins[c + 1 + k] = nc->s[0];
        }
        if (fresh != made) PyMem_Free(fresh);
        m->nchunks += extra;
        ch->n = size;
    } else if (ch->n < load / 2 && m->nchunks > 1) {
        if (c + 1 == m->nchunks) c--;
        Chunk *a = m->chunks[c], *b = m->chunks[c + 1];
        if (chunk_reserve(a, a->n + b->n) < 0) return -1;
        memcpy(a->s + a->n, b->s, b->n * sizeof(int64_t));
        memcpy(a->e + a->n, b->e, b->n * sizeof(int64_t));
        memcpy(a->v + a->n, b->v, b->n * sizeof(PyObject *));
        a->n += b->n;
        b->n = 0;
        chunks_remove(m, c + 1);
        return fix(m, c);
    }
    return 0;
}

/* Replace intervals [a, b) of chunk ch with the k given ones (their values get a new reference). */
static int chunk_replace(Core *m, Chunk *ch, Py_ssize_t a, Py_ssize_t b, Py_ssize_t k,
                         const int64_t *ns, const int64_t *ne, PyObject *const *nv) {
    Py_ssize_t removed = b - a;
    if (chunk_reserve(ch, ch->n - removed + k) < 0) return -1;
    if (m->ngrave + removed > m->capgrave) {
        Py_ssize_t cap = m->ngrave + removed + 16;
        PyObject **g = PyMem_Realloc(m->grave, cap * sizeof(PyObject *));
        if (g == NULL) return -1;
        m->grave = g;
        m->capgrave = cap;
    }
    for (Py_ssize_t i = a; i < b; i++) m->grave[m->ngrave++] = ch->v[i];
    Py_ssize_t tail = ch->n - b;
    if (k != removed) {
        memmove(ch->s + a + k, ch->s + b, tail * sizeof(int64_t));
        memmove(ch->e + a + k, ch->e + b, tail * sizeof(int64_t));
        memmove(ch->v + a + k, ch->v + b, tail * sizeof(PyObject *));
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        ch->s[a + j] = ns[j];
        ch->e[a + j] = ne[j];
        Py_INCREF(nv[j]);
        ch->v[a + j] = nv[j];
    }
    ch->n += k - removed;
    m->len += k - removed;
    return 0;
}

typedef struct {
    Py_ssize_t c, i;
} Pos;

/* The same position with i < n of its chunk, unless it is the end of the last chunk. */
static Pos normalize(Core *m, Pos p) {
    while (p.c + 1 < m->nchunks && p.i >= m->chunks[p.c]->n) {
        p.c++;
        p.i = 0;
    }
    return p;
}

/* --- Core --------------------------------------------------------------------------------------- */

/* Drop every interval: detached first, so a value's __del__ sees an empty, consistent core. */
static void core_clear_chunks(Core *m) {
    Chunk **chunks = m->chunks;
    Py_ssize_t nchunks = m->nchunks;
    m->chunks = NULL;
    m->mins = (PyMem_Free(m->mins), NULL);
    m->nchunks = m->capchunks = 0;
    m->len = 0;
    m->gc_values = 0;
    m->version++;
    for (Py_ssize_t c = 0; c < nchunks; c++) {
        Chunk *ch = chunks[c];
        for (Py_ssize_t i = 0; i < ch->n; i++) Py_DECREF(ch->v[i]);
        chunk_free(ch);
    }
    PyMem_Free(chunks);
    grave_empty(m);
}


/* An int from ranges.py's globals (-1 with an exception set when it is missing or not an int). */
static Py_ssize_t global_int(PyObject *name) {
    PyObject *o = PyDict_GetItemWithError(ranges_globals, name);
    if (o == NULL) {
        if (!PyErr_Occurred()) PyErr_SetObject(PyExc_NameError, name);
        return -1;
    }
    return PyLong_AsSsize_t(o);
}

/* Core(default=None, load=128).  ``RangeMap(default)`` arrives here first: while ranges._native is
   set, the map is made as the compiled layout's class straight away, with chunks of
   min(_LOAD, _NATIVE_LOAD) (read now: tests change them at run time), and no Python __init__
   runs; otherwise RangeMap.__init__ makes it a flat Python map. */
static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"default", "load", NULL};
    PyObject *deflt = NULL;
    Py_ssize_t load = -1;
    if (kwds == NULL && PyTuple_GET_SIZE(args) == 1) /* RangeMap(default): the common call */
        deflt = PyTuple_GET_ITEM(args, 0);
    else if (!PyArg_ParseTupleAndKeywords(args, kwds, "|On:Core", kwlist, &deflt, &load))
        return NULL;
    /* RangeMap(default) (a default, no load) is a new map; RangeMap.__new__(RangeMap) (nothing
       given, as ranges._new_flat calls it) is a flat one whatever _native says. */
    int is_new_map = deflt != NULL && load == -1;
    if (deflt == NULL) deflt = Py_None;
    if (load == -1) load = 128;
    if (load < 1) {
        PyErr_SetString(PyExc_ValueError, "load must be at least 1");
        return NULL;
    }
    if (type == flat_type && native_type != NULL && is_new_map) {
        PyObject *nat = PyDict_GetItemWithError(ranges_globals, str_native);
        if (nat == NULL && PyErr_Occurred()) return NULL;
        if (nat != NULL && nat != Py_None) {
            Py_ssize_t a = global_int(str_load), b = a < 0 ? a : global_int(str_native_load);
            if (b < 0) {
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "_LOAD must be at least 1");
                return NULL;
            }
            type = native_type;
            load = a < b ? a : b;
            if (load < 1) load = 1;
        }
    }
    Core *m = (Core *)type->tp_alloc(type, 0);
    if (m == NULL) return NULL;
    m->deflt = Py_NewRef(deflt);
    m->load = load;
    sync_default_slot(m);
    return (PyObject *)m;
}

/* Nothing to do: everything happened in core_new (the compiled layout's class runs no __init__). */
static int core_init(PyObject *self, PyObject *args, PyObject *kwds) {
    (void)self;
    (void)args;
    (void)kwds;
    return 0;
}

static int core_traverse(Core *m, visitproc visit, void *arg) {
    Py_VISIT(m->deflt);
    if (!m->gc_values) return 0; /* nothing a collector visits (it ignores non-GC objects) */
    for (Py_ssize_t c = 0; c < m->nchunks; c++) {
        Chunk *ch = m->chunks[c];
        for (Py_ssize_t i = 0; i < ch->n; i++) Py_VISIT(ch->v[i]);
    }
    return 0;
}

static int core_clear(Core *m) {
    core_clear_chunks(m);
    if (m->deflt != NULL) Py_SETREF(m->deflt, Py_NewRef(Py_None)); /* breaks a cycle through it */
    return 0;
}

static void core_dealloc(Core *m) {
    PyObject_GC_UnTrack(m);
    core_clear_chunks(m);
    Py_CLEAR(m->deflt);
    PyMem_Free(m->grave);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static Py_ssize_t core_len(Core *m) { return m->len; }

/* load(starts, ends, values): fill an empty core from the flat layout's three lists. */
static PyObject *core_load(Core *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyList_CheckExact(args[0]) || !PyList_CheckExact(args[1]) ||
        !PyList_CheckExact(args[2])) {
        PyErr_SetString(PyExc_TypeError, "load(starts, ends, values) takes three lists");
        return NULL;
    }
    if (m->nchunks) {
        PyErr_SetString(PyExc_ValueError, "load() needs an empty core");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(args[0]);
    if (PyList_GET_SIZE(args[1]) != n || PyList_GET_SIZE(args[2]) != n) {
        PyErr_SetString(PyExc_ValueError, "load() needs lists of one length");
        return NULL;
    }
    int64_t *s = PyMem_Malloc((n + 1) * sizeof(int64_t)), *e = PyMem_Malloc((n + 1) * sizeof(int64_t));
    if (s == NULL || e == NULL) {
        PyMem_Free(s);
        PyMem_Free(e);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        int r1 = key64(PyList_GET_ITEM(args[0], i), &s[i]);
        int r2 = r1 > 0 ? key64(PyList_GET_ITEM(args[1], i), &e[i]) : r1;
        if (r2 <= 0) {
            PyMem_Free(s);
            PyMem_Free(e);
            return r2 < 0 ? NULL : unsupported();
        }
    }
    Py_ssize_t load = m->load;
    for (Py_ssize_t k = 0; k < n; k += load) {
        Py_ssize_t cnt = n - k < load ? n - k : load;
        Chunk *ch = chunk_new(2 * load + 2 > cnt ? 2 * load + 2 : cnt);
        if (ch == NULL || chunks_reserve(m, m->nchunks + 1) < 0) {
            if (ch) chunk_free(ch);
            PyMem_Free(s);
            PyMem_Free(e);
            core_clear_chunks(m);
            return PyErr_NoMemory();
        }
        memcpy(ch->s, s + k, cnt * sizeof(int64_t));
        memcpy(ch->e, e + k, cnt * sizeof(int64_t));
        for (Py_ssize_t j = 0; j < cnt; j++) {
            PyObject *v = PyList_GET_ITEM(args[2], k + j);
            Py_INCREF(v);
            ch->v[j] = v;
            if (PyObject_IS_GC(v)) m->gc_values = 1;
        }
        ch->n = cnt;
        m->chunks[m->nchunks] = ch;
        m->mins[m->nchunks] = ch->s[0];
        m->nchunks++;
        m->len += cnt;
    }
    PyMem_Free(s);
    PyMem_Free(e);
    m->version++;
    Py_RETURN_NONE;
}

/* A key the compiled layout cannot take: ranges.py's _unsupported(name, *args) answers (it moves
   the map to a Python layout, or widens a query), before anything here changed. */
static PyObject *fallback(Core *m, const char *name, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *call[5];
    if (nargs > 3) return unsupported();
    call[0] = (PyObject *)m;
    call[1] = PyUnicode_FromString(name);
    if (call[1] == NULL) return NULL;
    for (Py_ssize_t k = 0; k < nargs; k++) call[2 + k] = args[k];
    PyObject *r = PyObject_VectorcallMethod(str_unsupported, call,
                                            (2 + nargs) | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(call[1]);
    return r;
}

/* The value at x (borrowed). */
static PyObject *map_get64(Core *m, int64_t x) {
    if (m->nchunks) {
        Py_ssize_t c = upper_bound(m->mins, m->nchunks, x) - 1;
        if (c >= 0) {
            Chunk *ch = m->chunks[c];
            Py_ssize_t i = upper_bound(ch->s, ch->n, x) - 1; /* >= 0: the chunk's first start <= x */
            if (x < ch->e[i]) return ch->v[i];
        }
    }
    return m->deflt;
}

static PyObject *core_get(Core *m, PyObject *key) {
    if (!PyLong_CheckExact(key)) return fallback(m, "get", &key, 1);
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(key, &overflow);
    if (x == -1 && PyErr_Occurred()) return NULL;
    if (overflow) return Py_NewRef(m->deflt); /* an index beyond int64 is past every interval */
    return Py_NewRef(map_get64(m, x));
}

/* Assign value to [start, end) (start < end): ranges._ChunkedRangeMap.set's rule to the letter.
   0 on success, -1 with an exception set. */
static int map_set64(Core *m, int64_t start, int64_t end, PyObject *value) {
    /* Comparing values may run Python code (an __eq__), and with it another thread that edits
       this map: everything read before the last comparison is re-read if the map changed. */
    int64_t start0 = start, end0 = end;
    int again = 0;
    if (PyObject_IS_GC(value)) m->gc_values = 1; /* before it can be stored (conservative) */
retry:
    if (again && native_type != NULL && Py_TYPE(m) != native_type) {
        /* the comparison's code moved the map to a Python layout (a key beyond int64): the edit
           is made there, not in this core, which the map no longer reads */
        PyObject *r = PyObject_CallMethod((PyObject *)m, "set", "LLO", (long long)start0,
                                          (long long)end0, value);
        if (r == NULL) return -1;
        Py_DECREF(r);
        return 0;
    }
    again = 1;
    start = start0;
    end = end0;
    uint64_t seen = m->version;
    int is_default = eq(value, m->deflt);
    if (is_default < 0) return -1;

    /* lo: the first interval that intersects or touches [start, end) (the last one starting
       before start, if it reaches start); hi: the first one starting after end. */
    Pos lo = {0, 0}, hi = {0, 0};
    if (m->nchunks) {
        Py_ssize_t c = lower_bound(m->mins, m->nchunks, start) - 1;
        if (c >= 0) {
            Chunk *ch = m->chunks[c];
            Py_ssize_t i = lower_bound(ch->s, ch->n, start) - 1;
            lo.c = c;
            lo.i = ch->e[i] >= start ? i : i + 1;
        }
        Chunk *ch = m->chunks[lo.c];
        /* a short edit ends in lo's chunk: look there first */
        if (ch->n && ch->s[ch->n - 1] > end) {
            /* a short edit touches one or two intervals: step over them before bisecting (a
               bisect of the chunk's tail would touch cache lines nothing else needs) */
            Py_ssize_t i = lo.i;
            while (i < lo.i + 3 && ch->s[i] <= end) i++;
            if (ch->s[i] <= end) i = upper_bound(ch->s + i, ch->n - i, end) + i;
            hi.c = lo.c;
            hi.i = i;
        } else {
            Py_ssize_t c2 = upper_bound(m->mins, m->nchunks, end) - 1;
            if (c2 >= 0) {
                hi.c = c2;
                hi.i = upper_bound(m->chunks[c2]->s, m->chunks[c2]->n, end);
            }
        }
        lo = normalize(m, lo);
        hi = normalize(m, hi);
    }
    int64_t ns[3], ne[3];
    PyObject *nv[3];
    int k = 0;
    if (m->version != seen) goto retry; /* only the default comparison so far */
    if (lo.c == hi.c && lo.i == hi.i) { /* touches nothing: a plain insert */
        if (is_default) return 0;
        if (m->nchunks == 0) {
            if (chunks_reserve(m, 1) < 0) return (PyErr_NoMemory(), -1);
            Chunk *ch = chunk_new(4); /* a small map stays small: chunks grow as needed */
            if (ch == NULL) return (PyErr_NoMemory(), -1);
            m->chunks[0] = ch;
            m->mins[0] = start;
            m->nchunks = 1;
        }
        ns[0] = start;
        ne[0] = end;
        nv[0] = value;
        if (chunk_replace(m, m->chunks[lo.c], lo.i, lo.i, 1, ns, ne, nv) < 0) return (PyErr_NoMemory(), -1);
    } else {
        Chunk *first = m->chunks[lo.c];
        Pos last = hi.i > 0 ? (Pos){hi.c, hi.i - 1} : (Pos){hi.c - 1, m->chunks[hi.c - 1]->n - 1};
        Chunk *lastch = m->chunks[last.c];
        int64_t s_lo = first->s[lo.i];
        if (s_lo < start) { /* left remainder, or the untouched left neighbour */
            PyObject *v_lo = first->v[lo.i];
            int same = eq(v_lo, value);
            if (same < 0) return -1;
            if (m->version != seen) goto retry;
            if (same) {
                start = s_lo;
            } else {
                int64_t e_lo = first->e[lo.i];
                ns[k] = s_lo;
                ne[k] = e_lo < start ? e_lo : start;
                nv[k++] = v_lo;
            }
        }
        if (!is_default) {
            ns[k] = start;
            ne[k] = end;
            nv[k++] = value;
        }
        int64_t e_hi = lastch->e[last.i];
        if (e_hi > end) { /* right remainder, or the untouched right neighbour */
            PyObject *v_hi = lastch->v[last.i];
            int same = eq(v_hi, value);
            if (same < 0) return -1;
            if (m->version != seen) goto retry;
            if (same) {
                if (is_default) {
                    PyErr_SetString(PyExc_AssertionError, "default value stored");
                    return -1;
                }
                ne[k - 1] = e_hi;
            } else {
                int64_t s_hi = lastch->s[last.i];
                ns[k] = s_hi > end ? s_hi : end;
                ne[k] = e_hi;
                nv[k++] = v_hi;
            }
        }
        if (lo.c == hi.c || (hi.i == 0 && hi.c == lo.c + 1)) {
            Py_ssize_t b = lo.c == hi.c ? hi.i : first->n;
            if (chunk_replace(m, first, lo.i, b, k, ns, ne, nv) < 0) return (PyErr_NoMemory(), -1);
        } else { /* spans chunks: cut lo's tail, hi's head, drop the chunks between */
            if (chunk_replace(m, first, lo.i, first->n, k, ns, ne, nv) < 0) return (PyErr_NoMemory(), -1);
            Py_ssize_t upto = hi.i > 0 ? hi.c : hi.c - 1; /* the last chunk losing intervals */
            for (Py_ssize_t c = lo.c + 1; c < upto; c++) {
                Chunk *ch = m->chunks[c];
                if (chunk_replace(m, ch, 0, ch->n, 0, NULL, NULL, NULL) < 0) return (PyErr_NoMemory(), -1);
            }
            Chunk *hc = m->chunks[upto];
            if (chunk_replace(m, hc, 0, hi.i > 0 ? hi.i : hc->n, 0, NULL, NULL, NULL) < 0)
                return (PyErr_NoMemory(), -1);
            /* drop the emptied middle chunks, then fix the head-cut one (now at lo.c + 1) */
            for (Py_ssize_t c = upto - 1; c > lo.c; c--) chunks_remove(m, c);
            if (fix(m, lo.c + 1) < 0) return (PyErr_NoMemory(), -1);
        }
    }
    /* lo's chunk may be gone: fixing lo.c + 1 can fold it into its predecessor (already fixed) */
    int r = lo.c < m->nchunks ? fix(m, lo.c) : 0;
    m->version++;
    grave_empty(m);
    if (r < 0) return (PyErr_NoMemory(), -1);
    return 0;
}

/* set(start, end, value): RangeMap.set in the compiled layout. */
static PyObject *core_set(Core *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "set() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    int64_t start = 0, end = 0;
    int r1 = key64(args[0], &start), r2 = r1 > 0 ? key64(args[1], &end) : r1;
    if (r2 < 0) return NULL;
    if (r2 == 0) {
        if (PyLong_CheckExact(args[0]) && PyLong_CheckExact(args[1])) {
            int ge = PyObject_RichCompareBool(args[0], args[1], Py_GE);
            if (ge < 0) return NULL;
            if (ge) Py_RETURN_NONE; /* an empty range changes nothing, whatever its bounds */
        }
        return fallback(m, "set", args, 3);
    }
    if (start < end && map_set64(m, start, end, args[2]) < 0) return NULL;
    Py_RETURN_NONE;
}

/* clear(): forget every interval (the map keeps its layout). */
static PyObject *core_clear_method(Core *m, PyObject *unused) {
    (void)unused;
    core_clear_chunks(m);
    Py_RETURN_NONE;
}

/* _reset(load, default): the chunk size and default of an empty core (a flat map about to take
   the compiled layout). */
static PyObject *core_reset(Core *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "_reset(load, default) takes 2 arguments");
        return NULL;
    }
    Py_ssize_t load = PyLong_AsSsize_t(args[0]);
    if (load == -1 && PyErr_Occurred()) return NULL;
    if (load < 1 || m->nchunks) {
        PyErr_SetString(PyExc_ValueError, "_reset(load, default) needs load >= 1 and an empty core");
        return NULL;
    }
    m->load = load;
    Py_SETREF(m->deflt, Py_NewRef(args[1]));
    sync_default_slot(m);
    Py_RETURN_NONE;
}

static PyObject *core_export(Core *m, PyObject *unused) {
    (void)unused;
    PyObject *s = PyList_New(m->len), *e = PyList_New(m->len), *v = PyList_New(m->len);
    if (s == NULL || e == NULL || v == NULL) goto fail;
    Py_ssize_t k = 0;
    for (Py_ssize_t c = 0; c < m->nchunks; c++) {
        Chunk *ch = m->chunks[c];
        for (Py_ssize_t i = 0; i < ch->n; i++, k++) {
            PyObject *a = PyLong_FromLongLong(ch->s[i]), *b = PyLong_FromLongLong(ch->e[i]);
            if (a == NULL || b == NULL) {
                Py_XDECREF(a);
                Py_XDECREF(b);
                goto fail;
            }
            PyList_SET_ITEM(s, k, a);
            PyList_SET_ITEM(e, k, b);
            PyList_SET_ITEM(v, k, Py_NewRef(ch->v[i]));
        }
    }
    return Py_BuildValue("(NNN)", s, e, v);
fail:
    Py_XDECREF(s);
    Py_XDECREF(e);
    Py_XDECREF(v);
    return NULL;
}

static PyObject *core_copy(Core *m, PyObject *unused) {
    (void)unused;
    Core *o = (Core *)Py_TYPE(m)->tp_alloc(Py_TYPE(m), 0);
    if (o == NULL) return NULL;
    o->deflt = Py_NewRef(m->deflt);
    o->load = m->load;
    o->gc_values = m->gc_values;
    sync_default_slot(o);
    if (chunks_reserve(o, m->nchunks) < 0) {
        Py_DECREF(o);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t c = 0; c < m->nchunks; c++) {
        Chunk *src = m->chunks[c], *ch = chunk_new(src->cap);
        if (ch == NULL) {
            Py_DECREF(o);
            return PyErr_NoMemory();
        }
        memcpy(ch->s, src->s, src->n * sizeof(int64_t));
        memcpy(ch->e, src->e, src->n * sizeof(int64_t));
        for (Py_ssize_t i = 0; i < src->n; i++) ch->v[i] = Py_NewRef(src->v[i]);
        ch->n = src->n;
        o->chunks[c] = ch;
        o->mins[c] = m->mins[c];
        o->nchunks++;
        o->len += ch->n;
    }
    return (PyObject *)o;
}

#define CHECK(cond, what)                                                                         \
    do {                                                                                           \
        if (!(cond)) {                                                                             \
            PyErr_Format(PyExc_AssertionError, "RangeMap core: %s (chunk %zd, index %zd)", what, c, \
                         i);                                                                       \
            return NULL;                                                                           \
        }                                                                                          \
    } while (0)

/* The structure's own invariants (chunks non-empty, within 2*load, mins right, count right, keys
   sorted and disjoint, ranges non-empty); ranges.py checks the values. */
static PyObject *core_check(Core *m, PyObject *unused) {
    (void)unused;
    Py_ssize_t total = 0, c = 0, i = -1;
    int have_prev = 0;
    int64_t prev_end = 0;
    for (c = 0; c < m->nchunks; c++) {
        Chunk *ch = m->chunks[c];
        i = -1;
        CHECK(ch->n > 0, "empty chunk");
        CHECK(ch->n <= 2 * m->load, "oversized chunk");
        CHECK(ch->n <= ch->cap, "count past capacity");
        CHECK(m->mins[c] == ch->s[0], "stale min");
        for (i = 0; i < ch->n; i++) {
            CHECK(ch->s[i] < ch->e[i], "empty interval");
            CHECK(!have_prev || prev_end <= ch->s[i], "overlapping intervals");
            prev_end = ch->e[i];
            have_prev = 1;
        }
        total += ch->n;
    }
    i = -1;
    CHECK(total == m->len, "count");
    CHECK(m->ngrave == 0, "values left unreleased");
    Py_RETURN_NONE;
}

/* --- iterators ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Core *core;
    uint64_t version;
    Pos p;
    int64_t pos, end; /* segments: the next piece starts at pos; items: resume at starts >= pos */
    int items, done, started;
} Iter;

/* segments: the first interval ending after pos (Python's bisect_right(starts, pos) - 1 rule). */
static void seek_segments(Iter *it) {
    Core *m = it->core;
    it->p = (Pos){0, 0};
    if (m->nchunks == 0) return;
    Py_ssize_t c = upper_bound(m->mins, m->nchunks, it->pos) - 1;
    if (c < 0) return;
    Chunk *ch = m->chunks[c];
    Py_ssize_t i = upper_bound(ch->s, ch->n, it->pos) - 1;
    if (ch->e[i] <= it->pos) i++;
    it->p = (Pos){c, i};
}

/* items after an edit: the first interval starting at or after pos. */
static void seek_items(Iter *it) {
    Core *m = it->core;
    it->p = (Pos){0, 0};
    if (m->nchunks == 0 || !it->started) return;
    Py_ssize_t c = upper_bound(m->mins, m->nchunks, it->pos) - 1;
    if (c < 0) return;
    Chunk *ch = m->chunks[c];
    it->p = (Pos){c, lower_bound(ch->s, ch->n, it->pos)};
}

static PyObject *triple(int64_t s, int64_t e, PyObject *v) {
    PyObject *a = PyLong_FromLongLong(s), *b = PyLong_FromLongLong(e);
    if (a == NULL || b == NULL) {
        Py_XDECREF(a);
        Py_XDECREF(b);
        return NULL;
    }
    PyObject *t = PyTuple_New(3);
    if (t == NULL) {
        Py_DECREF(a);
        Py_DECREF(b);
        return NULL;
    }
    PyTuple_SET_ITEM(t, 0, a);
    PyTuple_SET_ITEM(t, 1, b);
    PyTuple_SET_ITEM(t, 2, Py_NewRef(v));
    return t;
}

/* The next piece of a segments walk: 1 with (*s, *e, *v) set (v borrowed), 0 when done.  A walk
   survives edits between steps (the version check re-seeks from where it was). */
static int seg_step(Iter *it, int64_t *s_out, int64_t *e_out, PyObject **v_out) {
    if (it->done) return 0;
    Core *m = it->core;
    if (it->version != m->version) { /* edited meanwhile: carry on from where we were */
        it->version = m->version;
        seek_segments(it);
    }
    it->p = normalize(m, it->p);
    Chunk *ch = m->nchunks ? m->chunks[it->p.c] : NULL;
    int64_t pos = it->pos, end = it->end;
    *s_out = pos;
    if (ch == NULL || it->p.i >= ch->n || ch->s[it->p.i] >= end) {
        it->done = 1;
        *e_out = end;
        *v_out = m->deflt;
        return 1;
    }
    Py_ssize_t i = it->p.i;
    int64_t s = ch->s[i];
    if (s > pos) {
        it->pos = s;
        *e_out = s;
        *v_out = m->deflt;
        return 1;
    }
    int64_t e = ch->e[i];
    *v_out = ch->v[i];
    if (e >= end) {
        it->done = 1;
        *e_out = end;
        return 1;
    }
    it->pos = e;
    it->p.i++;
    *e_out = e;
    return 1;
}

static PyObject *iter_next(Iter *it) {
    if (it->done) return NULL;
    Core *m = it->core;
    if (!it->items) {
        int64_t s, e;
        PyObject *v;
        if (!seg_step(it, &s, &e, &v)) return NULL;
        return triple(s, e, v);
    }
    if (it->version != m->version) { /* edited meanwhile: carry on from where we were */
        it->version = m->version;
        seek_items(it);
    }
    it->p = normalize(m, it->p);
    Chunk *ch = m->nchunks ? m->chunks[it->p.c] : NULL;
    if (ch == NULL || it->p.i >= ch->n) {
        it->done = 1;
        return NULL;
    }
    Py_ssize_t i = it->p.i++;
    it->pos = ch->e[i];
    it->started = 1;
    return triple(ch->s[i], ch->e[i], ch->v[i]);
}

static int iter_traverse(Iter *it, visitproc visit, void *arg) {
    Py_VISIT(it->core);
    return 0;
}

static void iter_dealloc(Iter *it) {
    PyObject_GC_UnTrack(it);
    Py_CLEAR(it->core);
    PyObject_GC_Del(it);
}

static Iter *iter_make(Core *m, int items) {
    Iter *it = PyObject_GC_New(Iter, &IterType);
    if (it == NULL) return NULL;
    it->core = (Core *)Py_NewRef(m);
    it->version = m->version;
    it->p = (Pos){0, 0};
    it->pos = it->end = 0;
    it->items = items;
    it->done = 0;
    it->started = 0;
    PyObject_GC_Track(it);
    return it;
}

/* segments(start, end): maximal pieces covering [start, end), gaps as default. */
/* Both bounds as int64 (1), or not (0: the caller falls back), or an error (-1). */
static int bounds64(PyObject *const *args, int64_t *start, int64_t *end) {
    int r1 = key64(args[0], start);
    return r1 > 0 ? key64(args[1], end) : r1;
}

/* segments(start, end): maximal pieces covering [start, end), gaps as default. */
static PyObject *core_segments(Core *m, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "segments() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    int64_t start = 0, end = 0;
    int r = bounds64(args, &start, &end);
    if (r < 0) return NULL;
    if (r == 0) return fallback(m, "segments", args, 2);
    Iter *it = iter_make(m, 0);
    if (it == NULL) return NULL;
    it->pos = start;
    it->end = end;
    if (start >= end) it->done = 1;
    else seek_segments(it);
    return (PyObject *)it;
}

/* all_equal(start, end, value) / any_match(start, end, pred): RangeMap's, over the same pieces in
   the same order with the same calls (``v == value``, ``pred(v)``), stopping where they stop. */
static PyObject *walk(Core *m, PyObject *const *args, Py_ssize_t nargs, int any) {
    const char *name = any ? "any_match" : "all_equal";
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes 3 arguments (%zd given)", name, nargs);
        return NULL;
    }
    int64_t start = 0, end = 0;
    int r = bounds64(args, &start, &end);
    if (r < 0) return NULL;
    if (r == 0) return fallback(m, name, args, 3);
    if (start >= end) return Py_NewRef(any ? Py_False : Py_True);
    /* a walk on the stack (no Python object): it only holds the map, which the caller keeps alive */
    Iter it;
    it.core = m;
    it.version = m->version;
    it.pos = start;
    it.end = end;
    it.items = 0;
    it.done = 0;
    it.started = 0;
    seek_segments(&it);
    int64_t s, e;
    PyObject *v;
    while (seg_step(&it, &s, &e, &v)) {
        Py_INCREF(v); /* the call may edit the map and drop it */
        int t;
        if (any) {
            PyObject *res = PyObject_CallOneArg(args[2], v);
            t = res == NULL ? -1 : PyObject_IsTrue(res);
            Py_XDECREF(res);
        } else {
            t = eq(v, args[2]);
        }
        Py_DECREF(v);
        if (t < 0) return NULL;
        if (any ? t : !t) return Py_NewRef(any ? Py_True : Py_False);
    }
    return Py_NewRef(any ? Py_False : Py_True);
}

static PyObject *core_all_equal(Core *m, PyObject *const *args, Py_ssize_t nargs) {
    return walk(m, args, nargs, 0);
}

static PyObject *core_any_match(Core *m, PyObject *const *args, Py_ssize_t nargs) {
    return walk(m, args, nargs, 1);
}

static PyObject *core_items(Core *m, PyObject *unused) {
    (void)unused;
    return (PyObject *)iter_make(m, 1);
}

/* --- the C API for other accelerators ------------------------------------------------------------

   guestmem._rangemap._C_API is a PyCapsule named "guestmem._rangemap._C_API" holding a pointer to
   a RangeMapCAPI (declared in guestmem/_rangemap_capi.h: include it, and check ``abi`` first).  It lets
   compiled code read and edit a RangeMap without a Python method call:

       const RangeMapCAPI *api = PyCapsule_Import("guestmem._rangemap._C_API", 0);
       if (api->is_native(map)) { PyObject *v = api->get(map, gfn); ...; Py_DECREF(v); }

   Every function takes the RangeMap object itself and needs the GIL.  ``is_native(map)`` is 1 when
   the map currently has the compiled layout (class ranges._NativeRangeMap, exactly); only then may
   ``get``/``set`` be called on it.  Otherwise (GUESTMEM_PURE, a map that moved to a Python layout
   for a key beyond int64, a test running the Python layouts) call the Python methods instead.
   ``get(map, index)`` returns a new reference to the value at index (never NULL).
   ``set(map, start, end, value)`` is RangeMap.set(start, end, value) for int64 bounds: the same
   rule, the same ``==`` calls (which may run Python code), 0 or -1 with an exception set.
   ``length(map)`` is len(map).
   ``piece(map, index, &start, &end)`` returns the value at index (borrowed: valid until the map
   is next edited or Python code runs) and sets [start, end) to the maximal piece holding it — a
   stored interval, or the gap of ``default`` between its neighbours (INT64_MIN / INT64_MAX where
   the gap has no neighbour on that side, so it runs on beyond int64).  One call answers
   ``all_equal``/``any_match``/``segments`` for a range inside one piece.
   ``set_with_eq(map, start, end, value, eq)`` is ``set`` with ``eq(a, b)`` (1, 0, or -1 with an
   exception set) making every comparison the rule makes: a caller whose values have a Python
   ``__eq__`` it can decide in C passes its own, and the set then runs no Python code. */
/* (the struct: guestmem/_rangemap_capi.h) */

static int capi_is_native(PyObject *map) { return native_type != NULL && Py_TYPE(map) == native_type; }

static PyObject *capi_get(PyObject *map, int64_t index) { return Py_NewRef(map_get64((Core *)map, index)); }

static int capi_set(PyObject *map, int64_t start, int64_t end, PyObject *value) {
    return start < end ? map_set64((Core *)map, start, end, value) : 0;
}

static Py_ssize_t capi_length(PyObject *map) { return ((Core *)map)->len; }

/* set(), with ``eq`` deciding every ``==`` the rule makes (same calls, same order).  For a caller
   whose values have a Python __eq__ (a dataclass) that it can decide in C: the set then runs no
   Python code at all, so no other thread can run in the middle of it. */
static int capi_set_with_eq(PyObject *map, int64_t start, int64_t end, PyObject *value,
                            int (*cmp)(PyObject *a, PyObject *b)) {
    if (start >= end) return 0;
    int (*saved)(PyObject *, PyObject *) = eq_override;
    eq_override = cmp;
    int r = map_set64((Core *)map, start, end, value);
    eq_override = saved;
    return r;
}

static PyObject *capi_piece(PyObject *map, int64_t x, int64_t *start, int64_t *end) {
    Core *m = (Core *)map;
    int64_t lo = INT64_MIN, hi = INT64_MAX;
    Pos next = {0, 0}; /* the first interval starting after x */
    if (m->nchunks) {
        Py_ssize_t c = upper_bound(m->mins, m->nchunks, x) - 1;
        if (c >= 0) {
            Chunk *ch = m->chunks[c];
            Py_ssize_t i = upper_bound(ch->s, ch->n, x) - 1; /* >= 0: the chunk's first start <= x */
            if (x < ch->e[i]) {
                *start = ch->s[i];
                *end = ch->e[i];
                return ch->v[i];
            }
            lo = ch->e[i];
            next = (Pos){c, i + 1};
        }
        next = normalize(m, next);
        Chunk *nc = m->chunks[next.c];
        if (next.i < nc->n) hi = nc->s[next.i];
    }
    *start = lo;
    *end = hi;
    return m->deflt;
}

static const RangeMapCAPI capi = {GUESTMEM_RANGEMAP_CAPI_ABI, capi_is_native, capi_get, capi_set,
                                  capi_length, capi_piece, capi_set_with_eq};

/* _register(flat, native, globals): RangeMap, the compiled layout's class, and ranges.py's globals
   (see core_new and is_native). */
static PyObject *mod_register(PyObject *mod, PyObject *const *args, Py_ssize_t nargs) {
    (void)mod;
    if (nargs != 3 || !PyType_Check(args[0]) || !PyType_Check(args[1]) || !PyDict_Check(args[2]) ||
        !PyType_IsSubtype((PyTypeObject *)args[0], &CoreType) ||
        !PyType_IsSubtype((PyTypeObject *)args[1], (PyTypeObject *)args[0])) {
        PyErr_SetString(PyExc_TypeError, "_register(flat, native, globals) takes Core subclasses and a dict");
        return NULL;
    }
    PyObject *d = PyDict_GetItemWithError(((PyTypeObject *)args[0])->tp_dict, str_default);
    if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type ||
        ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "_register: RangeMap has no 'default' slot");
        return NULL;
    }
    default_offset = ((PyMemberDescrObject *)d)->d_member->offset;
    Py_XSETREF(flat_type, (PyTypeObject *)Py_NewRef(args[0]));
    Py_XSETREF(native_type, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(ranges_globals, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

static PyMethodDef core_methods[] = {
    {"get", (PyCFunction)core_get, METH_O, "get(index) -> the value at index"},
    {"set", (PyCFunction)(void (*)(void))core_set, METH_FASTCALL,
     "set(start, end, value): assign value to [start, end), merging equal neighbours"},
    {"segments", (PyCFunction)(void (*)(void))core_segments, METH_FASTCALL,
     "segments(start, end) -> iterator of maximal (s, e, value) pieces, gaps as default"},
    {"all_equal", (PyCFunction)(void (*)(void))core_all_equal, METH_FASTCALL,
     "all_equal(start, end, value) -> every index in [start, end) holds value"},
    {"any_match", (PyCFunction)(void (*)(void))core_any_match, METH_FASTCALL,
     "any_match(start, end, pred) -> some index in [start, end) has a value satisfying pred"},
    {"items", (PyCFunction)core_items, METH_NOARGS, "items() -> iterator of the stored intervals"},
    {"clear", (PyCFunction)core_clear_method, METH_NOARGS, "clear(): forget every interval"},
    {"copy", (PyCFunction)core_copy, METH_NOARGS, "copy() -> an independent map (values shared)"},
    {"_load", (PyCFunction)(void (*)(void))core_load, METH_FASTCALL,
     "_load(starts, ends, values): fill an empty core from sorted, merged lists"},
    {"_export", (PyCFunction)core_export, METH_NOARGS, "_export() -> (starts, ends, values) lists"},
    {"_reset", (PyCFunction)(void (*)(void))core_reset, METH_FASTCALL,
     "_reset(load, default): the chunk size and default of an empty core"},
    {"_check_core", (PyCFunction)core_check, METH_NOARGS, "_check_core(): assert the structure's invariants"},
    {NULL, NULL, 0, NULL},
};

static PySequenceMethods core_as_sequence = {.sq_length = (lenfunc)core_len};
static PyMappingMethods core_as_mapping = {.mp_length = (lenfunc)core_len,
                                           .mp_subscript = (binaryfunc)core_get};

static PyObject *core_get_default(Core *m, void *closure) {
    (void)closure;
    return Py_NewRef(m->deflt);
}

static int core_set_default(Core *m, PyObject *value, void *closure) {
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "a RangeMap's default cannot be deleted");
        return -1;
    }
    Py_SETREF(m->deflt, Py_NewRef(value));
    return 0;
}

static PyGetSetDef core_getset[] = {
    {"default", (getter)core_get_default, (setter)core_set_default, "the value of uncovered indices", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guestmem._rangemap.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Core(default, load): int64 intervals -> values in chunks (see the module docstring).",
    .tp_new = core_new,
    .tp_init = core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
    .tp_getset = core_getset,
    .tp_as_sequence = &core_as_sequence,
    .tp_as_mapping = &core_as_mapping,
};

static PyTypeObject IterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guestmem._rangemap.Iterator",
    .tp_basicsize = sizeof(Iter),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_dealloc = (destructor)iter_dealloc,
    .tp_traverse = (traverseproc)iter_traverse,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)iter_next,
};

static PyMethodDef module_methods[] = {
    {"_register", (PyCFunction)(void (*)(void))mod_register, METH_FASTCALL,
     "_register(flat, native, globals): RangeMap, its compiled layout's class, ranges.py's globals"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_rangemap",
                                    "The compiled layout of RangeMap (see guestmem.ranges).", -1,
                                    module_methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__rangemap(void) {
    if (PyType_Ready(&CoreType) < 0 || PyType_Ready(&IterType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    Unsupported = PyErr_NewException("guestmem._rangemap.Unsupported", NULL, NULL);
    str_unsupported = PyUnicode_InternFromString("_unsupported");
    str_native = PyUnicode_InternFromString("_native");
    str_load = PyUnicode_InternFromString("_LOAD");
    str_native_load = PyUnicode_InternFromString("_NATIVE_LOAD");
    str_default = PyUnicode_InternFromString("default");
    PyObject *caps = PyCapsule_New((void *)&capi, "guestmem._rangemap._C_API", NULL);
    int bad = Unsupported == NULL || str_unsupported == NULL || caps == NULL || str_native == NULL ||
              str_load == NULL || str_native_load == NULL || str_default == NULL ||
              PyModule_AddObjectRef(mod, "Unsupported", Unsupported) < 0 ||
              PyModule_AddObjectRef(mod, "Core", (PyObject *)&CoreType) < 0 ||
              PyModule_AddObjectRef(mod, "_C_API", caps) < 0;
    Py_XDECREF(caps);
    if (bad) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
