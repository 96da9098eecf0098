/* guestmem.model.kvm._fastfault: the accelerator of a lazily accepted page on the model's vCPU.
 *
 * A C specialisation of one Python path's common case, which stays the reference: ModelVcpu.run()
 * while the op at pc is an Accept (vcpu.py _accept -> mmu.translate -> arch.on_accept, and
 * fault.page_fault for one gfn -> GmemFile._get_pfn_one -> PageCache.get_page -> FramePool
 * alloc_range -> arch gmem_prepare -> Mmu.install), on the SNP-like and TDX-like flavours with
 * per-VM attributes and order-0 guest_memfd files.  RangeMaps in the compiled layout (every map,
 * where guestmem._rangemap is built) are read and edited through its C API (_rangemap_capi.h); a
 * map in a Python layout is served through its own methods, but only while this is the only Python
 * thread (see single_thread), else the accelerator declines.
 *
 * run_accept(vcpu) answers the exit the Python path would return, or NotImplemented.  Every unit
 * of work (one translated run and its acceptance; one fault) is planned first -- each of its
 * preconditions read, nothing written -- and then committed; a failed precondition returns
 * NotImplemented before that unit changes anything.  Units already committed are complete steps of
 * the Python path (their progress is saved in vcpu.progress, as _accept saves it), so the Python
 * path then resumes exactly where this stopped.  When the Accept op completes, pc and progress are
 * advanced as _run advances them and NotImplemented lets the Python interpreter run the next op.
 *
 * Locks.  The GIL is held from entry to the end of the last commit: no Python code runs (values are
 * compared in C, Spte and ExitMemoryFault objects built in C, no property or method implemented in
 * Python is called -- except a Python-layout map's own methods, and then no other Python thread exists),
 * so no other thread runs meanwhile.  The Python path's locks (mmu_lock, the inode's invalidate_lock
 * shared, the page cache's and the frame pool's locks, the pool's deferred-contents lock) are each taken
 * and released within one step with nothing else able to run in between; so instead of taking them
 * this code checks that each is free (and that this thread holds no named lock, and that no
 * interleaving explorer is installed: it needs every scheduling point), which makes taking and
 * releasing them an unobservable no-op.  The locks that are real mutexes here (page cache RLock,
 * pool lock, deferred-contents lock) are taken non-blocking for the duration of the commit all the
 * same.  A TDX accept writes no bytes: its encrypted zeros are deferred (FramePool.defer).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../../_rangemap_capi.h"
#include <stdint.h>
#include <string.h>
#include <structmember.h>

#define PAGE_SHIFT 12
#define PAGE_SIZE (1LL << PAGE_SHIFT)
#define TDX_SHARED_BIT (1LL << 47)

/* What setup() hands over: the classes and module dicts the checks compare against. */
static struct {
    int ready;
    PyObject *rangemap_type, *spte_type, *exit_mf, *accept_type, *program_type;
    PyObject *snp_type, *tdx_type;
    PyObject *sync_dict, *ranges_dict, *held, *finalize_registry;
    Py_ssize_t off_default; /* RangeMap's default slot */
    PyObject *exit_template; /* an ExitMemoryFault: its dict's keys in __init__'s order */
    PyTypeObject *types[32]; /* the classes among the originals' owners (borrowed: originals holds them) */
    unsigned int tags[32];   /* their version tags when the originals were last found in place */
    int ntypes;
    PyObject *originals; /* tuple of (owner, name, function): a monkeypatched one disables this */
    long long ehwpoison, max_index, efault, eio;
    long long flag_private_attr, flag_private_exit, mem_gmem, mem_readonly;
} G;

/* Interned attribute names. */
#define NAMES(X) X(default) X(program) X(ops) X(pc) X(cpu) \
    X(image) X(closed) X(halted) X(_pending) X(_running) X(locked) X(vm) X(bugged) X(system) \
    X(process) X(_deferred) X(options) X(arch) X(finalized) X(mmu) \
    X(mmu_lock) X(owner) X(_lock) X(gpa) X(size) X(progress) X(pool) X(sptes) X(accepted) \
    X(seq) X(in_progress) X(attributes) X(memslots) X(by_gfn) X(by_id) X(base_gfn) X(npages) \
    X(flags) X(dirty_bitmap) X(_gmem) X(released) X(inode) X(folio_order) X(gmem_pgoff) \
    X(invalidate_lock) X(_writer) X(_waiting_writers) X(_sleepers) X(_mutex) X(bindings) \
    X(hwpoison) X(cache) X(_delta) X(_order) X(_uptodate) X(_nr) X(_stats) X(populated) \
    X(zeroed) X(acquire) X(release) X(poison) X(_nfree) X(_free) X(_hint) X(capacity_pages) \
    X(_finalizer) X(alloc_calls) X(allocated_total) X(allocated) X(peak_allocated) X(rmp) \
    X(assigned) X(directmap_splits) X(as_id) X(_last_small) X(stats) X(faults) X(installs) \
    X(exits) X(private) X(order) X(delta) X(writable) X(engine) \
    X(pages_encrypted) X(zeros) X(_lazy) X(_lazy_lock) X(_exposed) X(stack) X(errno) X(_explorer) X(_LOAD) \
    X(__dict__) X(get)
#define DECL(n) static PyObject *S_##n;
NAMES(DECL)
#undef DECL

/* Outcome of a plan step: go on, give the case to the Python path, or a Python error. */
enum { OK = 0, BAIL = 1, ERR = -1 };

/* --- small accessors ------------------------------------------------------------------------- */

/* The attribute as a borrowed reference: only for attributes stored on the object (instance dict
 * or slot), which the object keeps alive; NULL (no error set) if missing.  Read from the instance
 * dict when there is one (every name read this way is a plain instance attribute: no class-level
 * descriptor shadows it), else through the type (slots). */
static PyObject *attr(PyObject *o, PyObject *name)
{
    PyObject **dp = _PyObject_GetDictPtr(o);
    if (dp != NULL && *dp != NULL) {
        PyObject *v = PyDict_GetItemWithError(*dp, name);
        if (v != NULL)
            return v;
        if (PyErr_Occurred()) {
            PyErr_Clear();
            return NULL;
        }
    }
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL) {
        PyErr_Clear();
        return NULL;
    }
    Py_DECREF(v);
    return v;
}

/* An exact int within int64 (bools count, as Python's arithmetic treats them). */
static int as_ll(PyObject *v, long long *out)
{
    int overflow;
    if (v == NULL || !PyLong_Check(v))
        return BAIL;
    *out = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (overflow || (*out == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return BAIL;
    }
    return OK;
}

static int attr_ll(PyObject *o, PyObject *name, long long *out)
{
    return as_ll(attr(o, name), out);
}

/* Truth of a stored bool/None/int attribute (BAIL for anything whose truth runs Python code). */
static int attr_truth(PyObject *o, PyObject *name, int *out)
{
    PyObject *v = attr(o, name);
    if (v == NULL)
        return BAIL;
    if (v == Py_None || v == Py_False) {
        *out = 0;
        return OK;
    }
    if (v == Py_True) {
        *out = 1;
        return OK;
    }
    if (PyLong_CheckExact(v)) {
        *out = PyObject_IsTrue(v);
        return OK;
    }
    return BAIL;
}

/* A threading.Lock/RLock not held by anyone: acquired non-blocking (1), or busy (0). */
static int try_acquire(PyObject *lock)
{
    PyObject *r = PyObject_CallMethodObjArgs(lock, S_acquire, Py_False, NULL);
    if (r == NULL)
        return -1;
    int got = (r == Py_True);
    Py_DECREF(r);
    return got;
}

static int release(PyObject *lock)
{
    PyObject *r = PyObject_CallMethodObjArgs(lock, S_release, NULL);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int is_locked(PyObject *lock, int *out)
{
    PyObject *r = PyObject_CallMethodObjArgs(lock, S_locked, NULL);
    if (r == NULL) {
        PyErr_Clear();
        return BAIL;
    }
    *out = (r == Py_True);
    Py_DECREF(r);
    return OK;
}

/* obj.name += delta for a stored int attribute (a counter). */
static int attr_add(PyObject *o, PyObject *name, long long delta)
{
    PyObject *v = PyObject_GetAttr(o, name);
    if (v == NULL)
        return -1;
    PyObject *d = PyLong_FromLongLong(delta);
    PyObject *n = d ? PyNumber_Add(v, d) : NULL;
    Py_DECREF(v);
    Py_XDECREF(d);
    if (n == NULL)
        return -1;
    int rc = PyObject_SetAttr(o, name, n);
    Py_DECREF(n);
    return rc;
}

static int attr_set_ll(PyObject *o, PyObject *name, long long value)
{
    PyObject *n = PyLong_FromLongLong(value);
    if (n == NULL)
        return -1;
    int rc = PyObject_SetAttr(o, name, n);
    Py_DECREF(n);
    return rc;
}

/* d[key] += 1 for a stats dict. */
static int dict_incr(PyObject *d, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(d, key);
    if (v == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, key);
        return -1;
    }
    PyObject *one = PyLong_FromLong(1);
    PyObject *n = one ? PyNumber_Add(v, one) : NULL;
    Py_XDECREF(one);
    if (n == NULL)
        return -1;
    int rc = PyDict_SetItem(d, key, n);
    Py_DECREF(n);
    return rc;
}

/* --- Spte values ----------------------------------------------------------------------------- */

/* Python's == between two values of the maps this code edits (ints, bools, None, Spte), without
 * running the dataclass's generated __eq__: same class and equal fields; other classes never
 * compare equal to an Spte (its __eq__ answers NotImplemented, then identity decides). */
static int spte_field(PyObject *sp, PyObject *name, PyObject **out)
{
    *out = attr(sp, name);
    return *out == NULL ? -1 : 0;
}

static int value_eq(PyObject *a, PyObject *b)
{
    if (a == b)
        return 1;
    PyTypeObject *st = (PyTypeObject *)G.spte_type;
    if (Py_TYPE(a) == st || Py_TYPE(b) == st) {
        if (Py_TYPE(a) != Py_TYPE(b))
            return 0;
        static PyObject **fields[] = {&S_private, &S_order, &S_delta, &S_writable};
        for (int i = 0; i < 4; i++) {
            PyObject *x, *y;
            if (spte_field(a, *fields[i], &x) || spte_field(b, *fields[i], &y))
                return -1;
            if (x == y)
                continue;
            if (!PyLong_Check(x) || !PyLong_Check(y))
                return -1;
            int r = PyObject_RichCompareBool(x, y, Py_EQ);
            if (r <= 0)
                return r;
        }
        return 1;
    }
    return PyObject_RichCompareBool(a, b, Py_EQ);
}

/* Spte(private, 0, delta, writable), built as the dataclass's __init__ builds it (fields in order
 * in the instance dict), without running it. */
static PyObject *new_spte(int private, long long delta, int writable)
{
    PyTypeObject *t = (PyTypeObject *)G.spte_type;
    PyObject *o = t->tp_alloc(t, 0);
    if (o == NULL)
        return NULL;
    PyObject *d = PyObject_GenericGetDict(o, NULL);
    if (d == NULL) {
        Py_DECREF(o);
        return NULL;
    }
    PyObject *zero = PyLong_FromLong(0), *dl = PyLong_FromLongLong(delta);
    int rc = (zero && dl) ? 0 : -1;
    rc = rc || PyDict_SetItem(d, S_private, private ? Py_True : Py_False);
    rc = rc || PyDict_SetItem(d, S_order, zero);
    rc = rc || PyDict_SetItem(d, S_delta, dl);
    rc = rc || PyDict_SetItem(d, S_writable, writable ? Py_True : Py_False);
    Py_XDECREF(zero);
    Py_XDECREF(dl);
    Py_DECREF(d);
    if (rc) {
        Py_DECREF(o);
        return NULL;
    }
    return o;
}

/* --- RangeMaps ---------------------------------------------------------------------------------- */

typedef struct {
    PyObject *map, *dflt; /* borrowed */
    int py; /* a Python layout: served by the map's own (Python) methods */
} Flat;

/* guestmem._rangemap's C API (_rangemap_capi.h), found by setup(): how the compiled layout --
 * every map's, when that core is built -- is read and edited here without a Python call.  NULL
 * when the core is not built. */
static const RangeMapCAPI *capi;

/* Whether this is the only Python thread (set per call): then the map's own methods, Python code,
 * may serve a map in a Python layout (the core not built, or a key beyond int64) -- no other
 * thread can run while they do.  Otherwise such a map makes the accelerator decline. */
static int single_thread;

/* Open a RangeMap: the compiled layout through the C API (no Python code runs), any other layout
 * through its methods when single_thread. */
static int flat(PyObject *map, Flat *f)
{
    if (map == NULL)
        return BAIL;
    f->map = map;
    f->py = 0;
    if (capi != NULL && capi->is_native(map)) {
        f->dflt = *(PyObject **)((char *)map + G.off_default); /* kept in step with the core's */
        return f->dflt == NULL ? BAIL : OK;
    }
    if (!single_thread || !PyObject_TypeCheck(map, (PyTypeObject *)G.rangemap_type))
        return BAIL;
    f->py = 1;
    f->dflt = attr(map, S_default);
    return f->dflt == NULL ? BAIL : OK;
}

/* RangeMap.get: borrowed (the map holds it); NULL (no error set) if the map's get raised. */
static PyObject *flat_get(Flat *f, long long x)
{
    PyObject *v;
    if (f->py) {
        PyObject *k = PyLong_FromLongLong(x);
        v = k ? PyObject_CallMethodOneArg(f->map, S_get, k) : NULL;
        Py_XDECREF(k);
        if (v == NULL) {
            PyErr_Clear();
            return NULL;
        }
    } else {
        v = capi->get(f->map, x);
    }
    Py_DECREF(v); /* stored in the map (or its default) */
    return v;
}

/* Pieces (s, e, value) covering [start, end) exactly, as RangeMap.segments yields them. */
typedef struct {
    Flat *f;
    long long pos, end;
    PyObject *it;
} Seg;

static int seg_begin(Seg *g, Flat *f, long long start, long long end)
{
    g->f = f;
    g->pos = start;
    g->end = end;
    g->it = NULL;
    if (!f->py)
        return OK; /* seg_next asks the core for the piece at pos each step */
    PyObject *r = PyObject_CallMethod(f->map, "segments", "LL", start, end);
    g->it = r ? PyObject_GetIter(r) : NULL;
    Py_XDECREF(r);
    if (g->it == NULL) {
        PyErr_Clear();
        return BAIL;
    }
    return OK;
}

static void seg_end(Seg *g)
{
    Py_CLEAR(g->it);
}

/* 1: a piece (its value borrowed: the map holds it), 0: done, -1: declined (no error set). */
static int seg_next(Seg *g, long long *s, long long *e, PyObject **v)
{
    if (g->it != NULL) {
        PyObject *t = PyIter_Next(g->it);
        if (t == NULL) {
            if (PyErr_Occurred()) {
                PyErr_Clear();
                return -1;
            }
            return 0;
        }
        int ok = PyTuple_CheckExact(t) && PyTuple_GET_SIZE(t) == 3 && !as_ll(PyTuple_GET_ITEM(t, 0), s) &&
                 !as_ll(PyTuple_GET_ITEM(t, 1), e);
        *v = ok ? PyTuple_GET_ITEM(t, 2) : NULL;
        Py_DECREF(t);
        return ok ? 1 : -1;
    }
    if (g->pos >= g->end)
        return 0;
    *s = g->pos; /* the maximal piece holding pos, cut at end: what segments yields */
    int64_t ps, pe;
    *v = capi->piece(g->f->map, g->pos, &ps, &pe);
    *e = pe < g->end ? pe : g->end;
    g->pos = *e;
    return 1;
}

/* The end of the first piece of segments(start, end) (start < end); -1 if declined. */
static long long flat_piece_end(Flat *f, long long start, long long end)
{
    Seg g;
    long long s, e;
    PyObject *v;
    if (seg_begin(&g, f, start, end))
        return -1;
    int r = seg_next(&g, &s, &e, &v);
    seg_end(&g);
    return r == 1 ? e : r == 0 ? end : -1;
}

/* The first index of [start, end) whose value is True, in a map of bools: OK with *at = that index
 * (-1 if none), BAIL if a value is not a bool or the map declined. */
static int flat_first_true(Flat *f, long long start, long long end, long long *at)
{
    Seg g;
    long long s, e;
    PyObject *v;
    int r;
    *at = -1;
    if (seg_begin(&g, f, start, end))
        return BAIL;
    while ((r = seg_next(&g, &s, &e, &v)) == 1) {
        if (v != Py_True && v != Py_False)
            break;
        if (v == Py_True) {
            *at = s;
            break;
        }
    }
    seg_end(&g);
    return r < 0 || (r == 1 && *at < 0) ? BAIL : OK;
}

/* RangeMap.set(start, end, value): the core's rule, with this file's C comparison (value_eq: no
 * Spte.__eq__ runs, so no Python code runs mid-commit); a Python layout's own set(). */
static int flat_set(Flat *f, long long start_ll, long long end_ll, PyObject *value)
{
    if (!f->py)
        return capi->set_with_eq(f->map, start_ll, end_ll, value, value_eq);
    PyObject *r = PyObject_CallMethod(f->map, "set", "LLO", start_ll, end_ll, value);
    Py_XDECREF(r);
    return r == NULL ? -1 : 0;
}

/* --- the per-call context ------------------------------------------------------------------------ */

typedef struct {
    PyObject *vcpu, *vm, *system, *arch, *mmu, *pool, *mmu_stats;
    int tdx;
    long long gpa;   /* the op's start, decoded */
    long long end;   /* the op's end */
    long long pos;
} Ctx;

static int set_progress(Ctx *c)
{
    return attr_set_ll(c->vcpu, S_progress, c->pos - c->gpa);
}

/* arch.on_accept(pool, s, e, pfn) for one translated run: plan, then commit. */
static int accept_run(Ctx *c, long long s, long long e, long long pfn)
{
    Flat acc;
    if (flat(attr(c->arch, S_accepted), &acc))
        return BAIL;
    if (!c->tdx) /* SNP: the RMP's validated bit, per frame */
        return flat_set(&acc, pfn, pfn + (e - s), Py_True) ? ERR : OK;
    /* TDX: ACCEPT clears each page not yet accepted -- encrypted zeros, deferred to first use
     * (EncryptionEngine.defer_zeros -> FramePool.defer) -- then marks the run. */
    long long todo[8][2];
    int ntodo = 0;
    Seg g;
    long long ps, pe;
    PyObject *v;
    int r;
    if (seg_begin(&g, &acc, s, e))
        return BAIL;
    while ((r = seg_next(&g, &ps, &pe, &v)) == 1) {
        if ((v != Py_True && v != Py_False) || (v == Py_False && ntodo == 8))
            break;
        if (v == Py_False) {
            todo[ntodo][0] = pfn + (ps - s);
            todo[ntodo][1] = pe - ps;
            ntodo++;
        }
    }
    seg_end(&g);
    if (r != 0)
        return BAIL;
    PyObject *engine = NULL, *zeros = NULL, *lock = NULL;
    Flat lazy;
    if (ntodo) {
        long long cap;
        engine = attr(c->arch, S_engine);
        zeros = engine ? attr(engine, S_zeros) : NULL;
        PyObject *exposed = attr(c->pool, S__exposed), *fin = attr(c->pool, S__finalizer);
        if (zeros == NULL || exposed == NULL || !PyAnySet_CheckExact(exposed) || PySet_GET_SIZE(exposed) != 0 ||
            fin == NULL || G.finalize_registry == NULL || attr_ll(c->pool, S_capacity_pages, &cap))
            return BAIL; /* a chunk's address went out (FramePool.defer decides per chunk), ... */
        int alive = PyDict_Contains(G.finalize_registry, fin);
        if (alive <= 0) { /* the pool is closed: the Python path raises */
            PyErr_Clear();
            return BAIL;
        }
        for (int k = 0; k < ntodo; k++)
            if (todo[k][0] < 0 || todo[k][0] + todo[k][1] > cap)
                return BAIL;
        if (flat(attr(c->pool, S__lazy), &lazy))
            return BAIL;
        lock = attr(c->pool, S__lazy_lock);
        if (lock == NULL)
            return BAIL;
        int got = try_acquire(lock);
        if (got <= 0)
            return got < 0 ? ERR : BAIL;
    }
    /* commit */
    long long total = 0;
    for (int k = 0; k < ntodo; k++) {
        if (flat_set(&lazy, todo[k][0], todo[k][0] + todo[k][1], zeros)) {
            release(lock);
            return ERR;
        }
        total += todo[k][1];
    }
    if (ntodo && (release(lock) || attr_add(engine, S_pages_encrypted, total)))
        return ERR;
    return flat_set(&acc, s, e, Py_True) ? ERR : OK;
}

/* memory_fault(gfn, True, err): ExitMemoryFault(gpa, PS, FLAG_PRIVATE, err), built as its dataclass
 * __init__ and __post_init__ build it (the instance dict's keys in the template's order, the fields
 * the constructor does not take copied from the template), without running them. */
static PyObject *memory_fault_exit(long long gfn, long long err)
{
    PyTypeObject *t = (PyTypeObject *)G.exit_mf;
    PyObject *tdict = G.exit_template ? PyObject_GenericGetDict(G.exit_template, NULL) : NULL;
    if (tdict == NULL)
        return NULL;
    PyObject *o = t->tp_alloc(t, 0), *d = o ? PyObject_GenericGetDict(o, NULL) : NULL;
    PyObject *vals[4] = {PyLong_FromLongLong(gfn << PAGE_SHIFT), PyLong_FromLongLong(PAGE_SIZE),
                         PyLong_FromLongLong(G.flag_private_exit), PyLong_FromLongLong(err)};
    int rc = d == NULL || !vals[0] || !vals[1] || !vals[2] || !vals[3];
    PyObject *k, *v;
    Py_ssize_t pos = 0;
    while (!rc && PyDict_Next(tdict, &pos, &k, &v)) {
        PyObject *x = v;
        if (k == S_gpa)
            x = vals[0];
        else if (k == S_size)
            x = vals[1];
        else if (k == S_flags)
            x = vals[2];
        else if (k == S_errno)
            x = vals[3];
        rc = PyDict_SetItem(d, k, x);
    }
    for (int i = 0; i < 4; i++)
        Py_XDECREF(vals[i]);
    Py_XDECREF(d);
    Py_DECREF(tdict);
    if (rc) {
        Py_XDECREF(o);
        return NULL;
    }
    return o;
}

/* The exit a fault of the private gfn returns before it allocates anything (mmu.stats["faults"]
 * counted first, as page_fault counts it). */
static PyObject *fault_exit(Ctx *c, long long gfn, long long err)
{
    if (dict_incr(c->mmu_stats, S_faults))
        return NULL;
    return memory_fault_exit(gfn, err);
}

/* page_fault(vm, gfn, end_gfn, "private", False) for one order-0 page: *res = NULL when the gfn
 * is now mapped, else the exit to return.  BAIL: nothing done, the Python path decides. */
static int fault_one(Ctx *c, long long gfn, long long end_gfn, PyObject **res)
{
    *res = NULL;
    PyObject *mmu = c->mmu;
    long long in_progress;
    if (attr_ll(mmu, S_in_progress, &in_progress) || in_progress)
        return BAIL; /* an invalidation is running: the Python path retries it properly */
    Flat attrs;
    if (flat(attr(c->vm, S_attributes), &attrs))
        return BAIL;
    long long a;
    if (as_ll(flat_get(&attrs, gfn), &a))
        return BAIL;
    if (!(a & G.flag_private_attr)) /* a private access to a shared gfn: the guest asks to convert */
        return (*res = fault_exit(c, gfn, G.efault)) ? OK : ERR;
    PyObject *memslots = attr(c->vm, S_memslots);
    if (memslots == NULL || !PyList_CheckExact(memslots) || PyList_GET_SIZE(memslots) < 1)
        return BAIL;
    PyObject *ms = PyList_GET_ITEM(memslots, 0);
    Flat by_gfn;
    if (flat(attr(ms, S_by_gfn), &by_gfn))
        return BAIL;
    PyObject *sid = flat_get(&by_gfn, gfn);
    if (sid == NULL)
        return BAIL;
    if (sid == Py_None)
        return (*res = fault_exit(c, gfn, G.efault)) ? OK : ERR;
    PyObject *by_id = attr(ms, S_by_id);
    if (by_id == NULL || !PyDict_CheckExact(by_id) || !PyLong_CheckExact(sid))
        return BAIL;
    PyObject *slot = PyDict_GetItem(by_id, sid);
    if (slot == NULL)
        return BAIL;
    long long base, npages, flags, pgoff, as_id;
    if (attr_ll(slot, S_base_gfn, &base) || attr_ll(slot, S_npages, &npages) || attr_ll(slot, S_flags, &flags) ||
        attr_ll(slot, S_gmem_pgoff, &pgoff) || attr_ll(slot, S_as_id, &as_id))
        return BAIL;
    long long stop = end_gfn;
    if (base + npages < stop)
        stop = base + npages;
    long long run_end = flat_piece_end(&attrs, gfn, end_gfn);
    if (run_end < 0)
        return BAIL;
    if (run_end < stop)
        stop = run_end;
    int logging;
    PyObject *bitmap = attr(slot, S_dirty_bitmap);
    if (bitmap == NULL)
        return BAIL;
    logging = bitmap != Py_None;
    if (!(flags & G.mem_gmem))
        return (*res = fault_exit(c, gfn, G.efault)) ? OK : ERR;
    PyObject *gfile = attr(slot, S__gmem);
    if (gfile == NULL)
        return BAIL;
    if (PyWeakref_CheckRef(gfile))
        gfile = PyWeakref_GetObject(gfile);
    if (gfile == Py_None)
        return (*res = fault_exit(c, gfn, G.efault)) ? OK : ERR;
    int released;
    if (attr_truth(gfile, S_released, &released))
        return BAIL;
    if (released) /* get_pfn: ([], EFAULT); the slot is still the one looked up */
        return (*res = fault_exit(c, gfn, G.efault)) ? OK : ERR;
    PyObject *inode = attr(gfile, S_inode);
    long long forder;
    if (inode == NULL || attr_ll(inode, S_folio_order, &forder) || forder || stop != gfn + 1)
        return BAIL; /* a run of gfns or large folios: the range path */
    /* filemap_invalidate_lock, shared: free of writers and waiters, so taking it is a no-op. */
    PyObject *sem = attr(inode, S_invalidate_lock);
    long long writers_waiting, sleepers;
    int mutex_busy;
    if (sem == NULL || attr(sem, S__writer) != Py_None || attr_ll(sem, S__waiting_writers, &writers_waiting) ||
        writers_waiting || attr_ll(sem, S__sleepers, &sleepers) || sleepers)
        return BAIL;
    PyObject *mutex = attr(sem, S__mutex);
    if (mutex == NULL || is_locked(mutex, &mutex_busy) || mutex_busy)
        return BAIL;
    long long i = gfn - base + pgoff;
    Flat bindings, hwpoison;
    if (flat(attr(gfile, S_bindings), &bindings) || flat(attr(inode, S_hwpoison), &hwpoison))
        return BAIL;
    PyObject *bound = flat_get(&bindings, i);
    if (bound == NULL)
        return BAIL;
    if (bound != slot)
        return (*res = fault_exit(c, gfn, G.eio)) ? OK : ERR;
    PyObject *poisoned = flat_get(&hwpoison, i);
    if (poisoned != Py_False) {
        if (poisoned != Py_True)
            return BAIL;
        return (*res = fault_exit(c, gfn, G.ehwpoison)) ? OK : ERR;
    }
    /* PageCache.get_page(i, zero=True) */
    PyObject *cache = attr(inode, S_cache);
    Flat delta, order, uptodate;
    if (cache == NULL || attr(cache, S_pool) == NULL || flat(attr(cache, S__delta), &delta) || flat(attr(cache, S__order), &order) ||
        flat(attr(cache, S__uptodate), &uptodate))
        return BAIL;
    PyObject *d = flat_get(&delta, i);
    int fresh = d == Py_None;
    long long dv = 0, ord;
    if (!fresh && as_ll(d, &dv))
        return BAIL;
    if (as_ll(flat_get(&order, i), &ord) || ord)
        return BAIL;
    PyObject *up = flat_get(&uptodate, i);
    if (up != Py_True && up != Py_False)
        return BAIL;
    if (!fresh && up == Py_False)
        return BAIL; /* a page to clear (punch): the Python path */
    if (fresh && up == Py_True)
        return BAIL;
    PyObject *cstats = attr(cache, S__stats), *clock = attr(cache, S__lock);
    if (cstats == NULL || clock == NULL)
        return BAIL;
    /* FramePool.alloc_range(1, 0) for a fresh page */
    PyObject *pool = attr(cache, S_pool), *plock = NULL, *free_map = NULL, *hint = NULL, *pstats = NULL;
    Flat pfree;
    long long base_pfn = -1, nfree = 0, cap = 0;
    if (fresh) {
        if (i < 0 || i >= G.max_index)
            return BAIL;
        PyObject *fin = attr(pool, S__finalizer);
        if (fin == NULL || attr(pool, S_poison) != Py_None || G.finalize_registry == NULL)
            return BAIL;
        int alive = PyDict_Contains(G.finalize_registry, fin);
        if (alive <= 0) {
            PyErr_Clear();
            return BAIL;
        }
        free_map = attr(pool, S__free);
        hint = attr(pool, S__hint);
        pstats = attr(pool, S__stats);
        plock = attr(pool, S__lock);
        if (flat(free_map, &pfree) || hint == NULL || !PyList_CheckExact(hint) ||
            PyList_GET_SIZE(hint) < 1 || pstats == NULL || plock == NULL || attr_ll(pool, S__nfree, &nfree) ||
            nfree < 1 || attr_ll(pool, S_capacity_pages, &cap))
            return BAIL;
        long long lo;
        if (as_ll(PyList_GET_ITEM(hint, 0), &lo) || lo >= cap)
            return BAIL;
        /* _find(1, 0): the first free frame at or after the hint */
        if (flat_first_true(&pfree, lo, cap, &base_pfn) || base_pfn < 0)
            return BAIL; /* (none: ENOMEM, which the Python path raises) */
    }
    long long pfn = fresh ? base_pfn : i + dv;
    /* SNP gmem_prepare: the RMP assigns the frame to the guest */
    PyObject *rmp = NULL;
    Flat assigned;
    int region_owned = 0;
    if (!c->tdx) {
        PyObject *sysdict = attr(c->system, S___dict__);
        rmp = sysdict && PyDict_CheckExact(sysdict) ? PyDict_GetItem(sysdict, S_rmp) : NULL;
        if (rmp == NULL || flat(attr(rmp, S_assigned), &assigned))
            return BAIL;
        long long rlo = pfn >> 9 << 9, owned_at;
        if (flat_first_true(&assigned, rlo, rlo + 512, &owned_at))
            return BAIL;
        region_owned = owned_at >= 0;
    }
    /* Mmu.install at order 0 */
    PyObject *sptes = attr(mmu, S_sptes);
    if (sptes == NULL || !PyList_CheckExact(sptes) || as_id < 0 || as_id >= PyList_GET_SIZE(sptes))
        return BAIL;
    Flat sp;
    if (flat(PyList_GET_ITEM(sptes, as_id), &sp))
        return BAIL;
    int writable = !(flags & G.mem_readonly) && !logging;
    PyObject *last = attr(mmu, S__last_small);
    if (last == NULL)
        return BAIL;
    int reuse = 0;
    if (last != Py_None) {
        long long ldelta;
        PyObject *lp = attr(last, S_private), *lw = attr(last, S_writable);
        if (Py_TYPE(last) != (PyTypeObject *)G.spte_type || attr_ll(last, S_delta, &ldelta) || lp == NULL ||
            lw == NULL || !PyBool_Check(lp) || !PyBool_Check(lw))
            return BAIL;
        /* install's test: the kept value is reused unless delta, private or writable differ */
        reuse = ldelta == pfn - gfn && lp == Py_True && (lw == Py_True) == writable;
    }
    /* The page cache's and the pool's mutexes: free, held for the commit. */
    int got = try_acquire(clock);
    if (got <= 0)
        return got < 0 ? ERR : BAIL;
    if (fresh) {
        got = try_acquire(plock);
        if (got <= 0) {
            if (release(clock))
                return ERR;
            return got < 0 ? ERR : BAIL;
        }
    }

    /* --- commit: page_fault, as fault.py orders it ------------------------------------------- */
    int rc = ERR;
    PyObject *spte = NULL;
    if (dict_incr(c->mmu_stats, S_faults))
        goto unlock;
    if (fresh) {
        if (flat_set(&pfree, base_pfn, base_pfn + 1, Py_False))
            goto unlock;
        nfree -= 1;
        PyObject *h = PyLong_FromLongLong(base_pfn + 1);
        if (h == NULL || PyList_SetItem(hint, 0, h) || attr_set_ll(pool, S__nfree, nfree) ||
            attr_add(pstats, S_alloc_calls, 1) || attr_add(pstats, S_allocated_total, 1) ||
            attr_set_ll(pstats, S_allocated, cap - nfree))
            goto unlock;
        long long peak;
        if (attr_ll(pstats, S_peak_allocated, &peak) != OK) {
            PyErr_SetString(PyExc_TypeError, "peak_allocated");
            goto unlock;
        }
        if (cap - nfree > peak && attr_set_ll(pstats, S_peak_allocated, cap - nfree))
            goto unlock;
        if (release(plock))
            goto unlock_cache;
        PyObject *dobj = PyLong_FromLongLong(base_pfn - i);
        if (dobj == NULL)
            goto unlock_cache;
        int r = flat_set(&delta, i, i + 1, dobj);
        Py_DECREF(dobj);
        long long nr;
        if (r || attr_ll(cache, S__nr, &nr) || attr_set_ll(cache, S__nr, nr + 1) || attr_add(cstats, S_populated, 1))
            goto unlock_cache;
    }
    if (up == Py_False) {
        if (flat_set(&uptodate, i, i + 1, Py_True) || attr_add(cstats, S_zeroed, 1))
            goto unlock_cache;
    }
    if (release(clock))
        return ERR;
    if (!c->tdx) {
        if (!region_owned && attr_add(rmp, S_directmap_splits, 1))
            return ERR;
        if (flat_set(&assigned, pfn, pfn + 1, Py_True))
            return ERR;
    }
    if (reuse) {
        spte = Py_NewRef(last);
    } else {
        spte = new_spte(1, pfn - gfn, writable);
        if (spte == NULL || PyObject_GenericSetAttr(mmu, S__last_small, spte))
            goto fail;
    }
    if (flat_set(&sp, gfn, gfn + 1, spte) || dict_incr(c->mmu_stats, S_installs))
        goto fail;
    Py_DECREF(spte);
    return OK;
unlock:
    if (fresh)
        release(plock);
unlock_cache:
    release(clock);
    return rc;
fail:
    Py_XDECREF(spte);
    return ERR;
}

/* The explorer is off, this thread holds no named lock, and nothing the Python path would
 * call instead was monkeypatched. */
static int environment_ok(void)
{
    PyObject *ex = PyDict_GetItem(G.sync_dict, S__explorer);
    if (ex == NULL || ex != Py_None)
        return BAIL;
    /* threading.local: its own getattro finds this thread's dict (never the instance dict slot) */
    PyObject *st = PyObject_GetAttr(G.held, S_stack);
    if (st == NULL) {
        PyErr_Clear();
        return BAIL;
    }
    Py_DECREF(st); /* this thread's dict holds it */
    if (st == NULL || !PyList_CheckExact(st) || PyList_GET_SIZE(st))
        return BAIL;
    /* The classes' version tags change whenever an attribute of theirs (or of a base) is set: while
     * none has, only the module-level originals need looking up. */
    int fresh = 1;
    for (int k = 0; k < G.ntypes; k++) {
        PyTypeObject *t = G.types[k];
        if (!(t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) || t->tp_version_tag != G.tags[k] || !G.tags[k])
            fresh = 0;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(G.originals);
    for (Py_ssize_t k = 0; k < n; k++) {
        PyObject *t = PyTuple_GET_ITEM(G.originals, k), *owner = PyTuple_GET_ITEM(t, 0);
        PyObject *cur;
        if (PyType_Check(owner)) {
            if (fresh)
                continue;
            cur = _PyType_Lookup((PyTypeObject *)owner, PyTuple_GET_ITEM(t, 1)); /* borrowed, MRO */
        } else {
            cur = PyDict_GetItem(PyModule_GetDict(owner), PyTuple_GET_ITEM(t, 1));
        }
        if (cur != PyTuple_GET_ITEM(t, 2))
            return BAIL;
    }
    if (!fresh) /* every original is in place: remember the tags the lookups left */
        for (int k = 0; k < G.ntypes; k++) {
            PyTypeObject *t = G.types[k];
            G.tags[k] = (t->tp_flags & Py_TPFLAGS_VALID_VERSION_TAG) ? t->tp_version_tag : 0;
        }
    return OK;
}

#define TRY(x)                \
    do {                      \
        int r_ = (x);         \
        if (r_ == BAIL)       \
            goto bail;        \
        if (r_ == ERR)        \
            return NULL;      \
    } while (0)

static PyObject *run_accept(PyObject *module, PyObject *vcpu)
{
    (void)module;
    if (!G.ready)
        Py_RETURN_NOTIMPLEMENTED;
    Ctx c = {0};
    c.vcpu = vcpu;
    /* ModelVcpu.run()'s checks and _run()'s dispatch: an Accept at pc, nothing pending */
    PyObject *program = attr(vcpu, S_program);
    if (program == NULL || Py_TYPE(program) != (PyTypeObject *)G.program_type)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *ops = attr(program, S_ops);
    long long pc;
    if (ops == NULL || !PyTuple_CheckExact(ops) || attr_ll(vcpu, S_pc, &pc) || pc < 0 ||
        pc >= PyTuple_GET_SIZE(ops))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *op = PyTuple_GET_ITEM(ops, pc);
    if (Py_TYPE(op) != (PyTypeObject *)G.accept_type)
        Py_RETURN_NOTIMPLEMENTED; /* first, so that a run of any other op pays only this */
    if (environment_ok())
        Py_RETURN_NOTIMPLEMENTED;
    PyThreadState *head = PyInterpreterState_ThreadHead(PyInterpreterState_Get());
    single_thread = head != NULL && PyThreadState_Next(head) == NULL;
    int closed, halted, busy, bugged, finalized;
    if (attr(vcpu, S_cpu) != Py_None || attr(vcpu, S_image) != Py_None || attr(vcpu, S__pending) != Py_None ||
        attr_truth(vcpu, S_closed, &closed) || closed || attr_truth(vcpu, S_halted, &halted) || halted)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *running = attr(vcpu, S__running);
    if (running == NULL || is_locked(running, &busy) || busy)
        Py_RETURN_NOTIMPLEMENTED;
    c.vm = attr(vcpu, S_vm);
    if (c.vm == NULL || attr_truth(c.vm, S_bugged, &bugged) || bugged)
        Py_RETURN_NOTIMPLEMENTED;
    c.system = attr(c.vm, S_system);
    PyObject *process = c.system ? attr(c.system, S_process) : NULL;
    PyObject *deferred = process ? attr(process, S__deferred) : NULL;
    if (deferred == NULL || PyObject_Length(deferred) != 0) {
        PyErr_Clear();
        Py_RETURN_NOTIMPLEMENTED;
    }
    /* options.gmem_attributes (a property: attributes == "gmem"), read from its field */
    PyObject *options = attr(c.system, S_options);
    PyObject *attributes = options ? attr(options, S_attributes) : NULL;
    if (attributes == NULL || !PyUnicode_CheckExact(attributes) ||
        !PyUnicode_CompareWithASCIIString(attributes, "gmem"))
        Py_RETURN_NOTIMPLEMENTED;
    c.arch = attr(c.vm, S_arch);
    if (c.arch == NULL)
        Py_RETURN_NOTIMPLEMENTED;
    if (Py_TYPE(c.arch) == (PyTypeObject *)G.tdx_type)
        c.tdx = 1;
    else if (Py_TYPE(c.arch) != (PyTypeObject *)G.snp_type)
        Py_RETURN_NOTIMPLEMENTED;
    if (attr_truth(c.arch, S_finalized, &finalized) || !finalized)
        Py_RETURN_NOTIMPLEMENTED; /* check_fault_allowed bugs the VM: the Python path does that */
    /* mmu_lock: free (no owner, not locked), so taking it here would be a no-op */
    c.mmu = attr(c.vm, S_mmu);
    PyObject *mmu_lock = attr(c.vm, S_mmu_lock);
    PyObject *inner = mmu_lock ? attr(mmu_lock, S__lock) : NULL;
    if (c.mmu == NULL || inner == NULL || attr(mmu_lock, S_owner) != Py_None || is_locked(inner, &busy) || busy)
        Py_RETURN_NOTIMPLEMENTED;
    c.mmu_stats = attr(c.mmu, S_stats);
    c.pool = attr(c.system, S_pool);
    if (c.mmu_stats == NULL || !PyDict_CheckExact(c.mmu_stats) || c.pool == NULL)
        Py_RETURN_NOTIMPLEMENTED;
    long long gpa, size, progress;
    if (attr_ll(vcpu, S_progress, &progress))
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *sptes = attr(c.mmu, S_sptes);
    if (sptes == NULL || !PyList_CheckExact(sptes) || PyList_GET_SIZE(sptes) < 1)
        Py_RETURN_NOTIMPLEMENTED;
    PyObject *sp0 = PyList_GET_ITEM(sptes, 0);

next_op: /* _run's loop, for as long as the op at pc is an Accept */
    if (attr_ll(op, S_gpa, &gpa) || attr_ll(op, S_size, &size))
        goto bail;
    if (c.tdx && (gpa & TDX_SHARED_BIT))
        gpa &= ~TDX_SHARED_BIT;
    if (gpa < 0 || size < 0 || progress < 0 || gpa > (1LL << 60) || size > (1LL << 60) || progress > (1LL << 60))
        goto bail;
    c.gpa = gpa;
    c.end = gpa + size;
    c.pos = gpa + progress;

    /* _accept's loop */
    while (c.pos < c.end) {
        long long gfn = c.pos >> PAGE_SHIFT, end_gfn = (c.end + PAGE_SIZE - 1) >> PAGE_SHIFT;
        /* translate(0, gfn, end_gfn, want_private=True, write=False), then on_accept per run */
        long long cur = gfn;
        while (cur < end_gfn) {
            Flat sp;
            Seg g;
            long long ps, e;
            PyObject *v;
            TRY(flat(sp0, &sp));
            TRY(seg_begin(&g, &sp, cur, end_gfn));
            int r = seg_next(&g, &ps, &e, &v);
            seg_end(&g);
            if (r != 1)
                goto bail;
            if (v == Py_None)
                break; /* no SPTE here */
            long long delta;
            if (Py_TYPE(v) != (PyTypeObject *)G.spte_type)
                goto bail;
            PyObject *priv = attr(v, S_private);
            if (priv != Py_True && priv != Py_False)
                goto bail;
            if (priv == Py_False)
                break; /* a shared SPTE: not usable for a private access */
            if (attr_ll(v, S_delta, &delta))
                goto bail;
            TRY(accept_run(&c, cur, e, cur + delta));
            c.pos = e << PAGE_SHIFT < c.end ? e << PAGE_SHIFT : c.end;
            if (set_progress(&c))
                return NULL;
            cur = e;
        }
        if (c.pos >= c.end)
            break;
        PyObject *res;
        TRY(fault_one(&c, c.pos >> PAGE_SHIFT, end_gfn, &res));
        if (res != NULL) { /* the exit _accept returns; run() counts it */
            PyObject *vstats = attr(vcpu, S_stats);
            if (vstats == NULL || !PyDict_CheckExact(vstats) || dict_incr(vstats, S_exits)) {
                if (vstats == NULL)
                    PyErr_SetString(PyExc_AttributeError, "stats");
                Py_DECREF(res);
                return NULL;
            }
            return res;
        }
    }
    /* The op is done: _run moves on to the next op; another Accept is carried on here, anything
     * else is left to the Python interpreter. */
    pc += 1;
    progress = 0;
    if (attr_set_ll(vcpu, S_pc, pc) || attr_set_ll(vcpu, S_progress, 0))
        return NULL;
    if (pc < PyTuple_GET_SIZE(ops)) {
        op = PyTuple_GET_ITEM(ops, pc);
        if (Py_TYPE(op) == (PyTypeObject *)G.accept_type)
            goto next_op;
    }
bail:
    Py_RETURN_NOTIMPLEMENTED;
}

static PyObject *setup(PyObject *module, PyObject *d)
{
    (void)module;
    if (!PyDict_Check(d)) {
        PyErr_SetString(PyExc_TypeError, "setup takes a dict");
        return NULL;
    }
#define GET(field, name)                                                        \
    do {                                                                        \
        PyObject *v_ = PyDict_GetItemString(d, name);                           \
        if (v_ == NULL) {                                                       \
            PyErr_Format(PyExc_KeyError, "setup: %s missing", name);            \
            return NULL;                                                        \
        }                                                                       \
        Py_XSETREF(G.field, Py_NewRef(v_));                                     \
    } while (0)
    GET(rangemap_type, "RangeMap");
    GET(spte_type, "Spte");
    GET(exit_mf, "ExitMemoryFault");
    GET(accept_type, "Accept");
    GET(program_type, "Program");
    GET(snp_type, "SnpFlavour");
    GET(tdx_type, "TdxFlavour");
    GET(sync_dict, "sync_dict");
    GET(ranges_dict, "ranges_dict");
    GET(held, "held");
    GET(finalize_registry, "finalize_registry");
    GET(originals, "originals");
    GET(exit_template, "exit_template");
#undef GET
    if (!PyTuple_CheckExact(G.originals) || !PyDict_Check(G.sync_dict) || !PyDict_Check(G.ranges_dict) ||
        !PyDict_Check(G.finalize_registry)) {
        PyErr_SetString(PyExc_TypeError, "setup: bad types");
        return NULL;
    }
    const char *ints[] = {"EHWPOISON", "MAX_INDEX", "EFAULT", "EIO", "ATTR_PRIVATE", "EXIT_PRIVATE",
                          "MEM_GUEST_MEMFD", "MEM_READONLY"};
    long long *dst[] = {&G.ehwpoison, &G.max_index, &G.efault, &G.eio, &G.flag_private_attr,
                        &G.flag_private_exit, &G.mem_gmem, &G.mem_readonly};
    for (int k = 0; k < 8; k++) {
        PyObject *v = PyDict_GetItemString(d, ints[k]);
        if (v == NULL) {
            PyErr_Format(PyExc_KeyError, "setup: %s missing", ints[k]);
            return NULL;
        }
        if (as_ll(v, dst[k])) {
            PyErr_Format(PyExc_TypeError, "setup: %s must be an int64", ints[k]);
            return NULL;
        }
    }
    if (Py_TYPE(G.exit_template) != (PyTypeObject *)G.exit_mf ||
        ((PyTypeObject *)G.exit_mf)->tp_new != PyBaseObject_Type.tp_new ||
        ((PyTypeObject *)G.spte_type)->tp_new != PyBaseObject_Type.tp_new) {
        PyErr_SetString(PyExc_TypeError, "setup: ExitMemoryFault/Spte are not plain dataclasses");
        return NULL;
    }
    G.ntypes = 0;
    for (Py_ssize_t k = 0; k < PyTuple_GET_SIZE(G.originals); k++) {
        PyObject *t = PyTuple_GET_ITEM(G.originals, k);
        if (!PyTuple_CheckExact(t) || PyTuple_GET_SIZE(t) != 3 ||
            !(PyType_Check(PyTuple_GET_ITEM(t, 0)) || PyModule_Check(PyTuple_GET_ITEM(t, 0)))) {
            PyErr_SetString(PyExc_TypeError, "setup: originals are (class or module, name, object)");
            return NULL;
        }
        if (PyType_Check(PyTuple_GET_ITEM(t, 0))) {
            PyTypeObject *owner = (PyTypeObject *)PyTuple_GET_ITEM(t, 0);
            int seen = 0;
            for (int j = 0; j < G.ntypes; j++)
                seen |= G.types[j] == owner;
            if (!seen) {
                if (G.ntypes == 32) {
                    PyErr_SetString(PyExc_ValueError, "setup: more than 32 classes among the originals");
                    return NULL;
                }
                G.tags[G.ntypes] = 0; /* unknown: the first call looks everything up */
                G.types[G.ntypes++] = owner;
            }
        }
    }
    PyObject *descr = PyDict_GetItem(((PyTypeObject *)G.rangemap_type)->tp_dict, S_default);
    if (descr == NULL || !PyObject_TypeCheck(descr, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)descr)->d_member->type != T_OBJECT_EX) {
        PyErr_SetString(PyExc_TypeError, "setup: RangeMap's layout has no 'default' slot");
        return NULL;
    }
    G.off_default = ((PyMemberDescrObject *)descr)->d_member->offset;
    capi = NULL; /* not built: no map has the compiled layout */
    const RangeMapCAPI *api = PyCapsule_Import("guestmem._rangemap._C_API", 0);
    if (api == NULL)
        PyErr_Clear();
    else if (api->abi == GUESTMEM_RANGEMAP_CAPI_ABI)
        capi = api;
    G.ready = 1;
    Py_RETURN_NONE;
}

/* flat_set() on its own, for the tests that hold it to RangeMap.set: NotImplemented where the
 * accelerator would decline (a map in a Python layout: this entry never counts as single-threaded). */
static PyObject *rangemap_set(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    (void)module;
    long long start, end;
    Flat f;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "rangemap_set(map, start, end, value)");
        return NULL;
    }
    single_thread = 0;
    if (!G.ready || flat(args[0], &f) || as_ll(args[1], &start) || as_ll(args[2], &end))
        Py_RETURN_NOTIMPLEMENTED;
    if (flat_set(&f, start, end, args[3]))
        return NULL;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"rangemap_set", (PyCFunction)(void (*)(void))rangemap_set, METH_FASTCALL,
     "rangemap_set(map, start, end, value): the accelerator's RangeMap.set (compiled layout only)."},
    {"run_accept", run_accept, METH_O,
     "run_accept(vcpu): ModelVcpu.run() for an Accept op's common case, or NotImplemented."},
    {"setup", setup, METH_O, "setup(dict): the classes and constants the checks compare against."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_fastfault",
    "Accelerator of the model vCPU's lazy-accept path (see vcpu.py); the Python path is the reference.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__fastfault(void)
{
#define INTERN(n)                                    \
    if ((S_##n = PyUnicode_InternFromString(#n)) == NULL) \
        return NULL;
    NAMES(INTERN)
#undef INTERN
    return PyModule_Create(&moduledef);
}
