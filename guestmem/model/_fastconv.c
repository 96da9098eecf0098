/*
 * guestmem.model._fastconv: the one-page steps of a conversion, compiled (an accelerator).
 *
 * Why: a VMM that accepts guest memory lazily converts one 4 KiB page per fault, and the model's
 * Python paths for that page -- KVM_SET_MEMORY_ATTRIBUTES (guestmem/model/kvm/attributes.py) and
 * the shared side's MADV_REMOVE (guestmem/model/process.py) -- cost 20-30 us each in calls of a
 * general-purpose range code.  This module specialises their common case: one page, the per-VM
 * attribute store, nothing mapped in the SPTEs of that gfn, no explorer, no lock held.
 *
 * The accelerator contract (guestmem/native.py): every entry first checks every precondition of the
 * case it handles, reading state only; if one fails it returns NotImplemented before changing
 * anything and the Python path (the reference, unchanged) runs from a clean state.  When it does
 * run it makes exactly the changes, in the same maps, with the same counters, that the Python path
 * makes, so no public call or snapshot can tell the two apart.
 *
 * Locks.  The Python path takes slots_lock and mmu_lock (guestmem.sync.NamedLock) around its work.
 * Here the work runs with the GIL held from the first change to the last and calls no Python code
 * (only C methods of lists, dicts, ints, threading.Lock and the compiled RangeMap core), so no
 * other thread can run in between; the entry checks that neither lock is held by anyone (and that
 * this thread holds no named lock at all, so the lock order cannot be violated) and then does the
 * work as if it had taken and released both locks in one step; the cyclic GC is paused meanwhile, so
 * no finalizer can run Python code in the middle.  Anything that would run Python code
 * (a RangeMap about to change layout, an SPTE to zap, an explorer, a non-int value) is refused by
 * the checks, before any change.
 *
 * RangeMaps are read and edited here through guestmem._rangemap's C API (_rangemap_capi.h): where
 * that core is built every map has its layout.  A map in a Python layout (no core, or a key beyond
 * int64) is refused.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "../_rangemap_capi.h"
#include <structmember.h>
#include <limits.h>

#define PAGE 4096ULL
#define ATTR_PRIVATE 8ULL /* KVM_MEMORY_ATTRIBUTE_PRIVATE */
#define MAX_TARGETS 4

/* Configured once by guestmem.model.kvm.attributes (configure()). */
static PyObject *SyncDict, *Held, *VmType, *ShmemType,
    *PageCacheType;

static PyObject *s_default, *s_explorer, *s_stack,
    *s_system, *s_process, *s_deferred, *s_fd, *s_options, *s_attributes, *s_memory_attributes,
    *s_arch, *s_has_private_mem, *s_slots_lock, *s_mmu_lock, *s_lock, *s_locked, *s_memslots,
    *s_by_gfn, *s_by_id, *s_mmu, *s_sptes, *s_as_id, *s_base_gfn, *s_npages, *s_lpage_mixed,
    *s_stats, *s_conversions, *s_in_progress, *s_range_start, *s_range_end, *s_seq, *s_get,
    *s_set, *s_segments, *s_gmem, *s_nine, *s_eighteen, *s_acquire, *s_release, *s_closed, *s_shared,
    *s_length, *s_pgoff, *s_file, *s_cache, *s__delta, *s__order, *s__uptodate, *s__refs, *s_by_file,
    *s_mappings, *s_addr, *s_mapped, *s_notifiers, *s_userspace_addr;

#define NI() Py_NewRef(Py_NotImplemented)

/* Byte offset of RangeMap's ``default`` slot in its instances, read from the class's member
   descriptor by configure(): the same read PyMember_GetOne makes, without the attribute lookup.
   -1 until configured. */
static Py_ssize_t off_default = -1;

/* guestmem._rangemap's C API (its capsule _C_API, abi 1; the struct is declared there): how the
   compiled RangeMap layout is read and edited here without a Python method call.  NULL when the
   core is not built, and then no map has that layout. */
static const RangeMapCAPI *capi;

/* A slot's value as a new reference, or NULL (no exception) when it is unset. */
static PyObject *slot_get(PyObject *obj, Py_ssize_t off) {
    PyObject *v = *(PyObject **)((char *)obj + off);
    Py_XINCREF(v);
    return v;
}

/* ---- RangeMap access ------------------------------------------------------------------------- */

/* Maps are read and edited through guestmem._rangemap's C API only: every map has the compiled
   layout where that core is built.  A map in a Python layout (the core not built, or a key beyond
   int64) is refused, and the Python path, whose RangeMap methods serve any layout, runs. */
typedef struct {
    PyObject *map;   /* borrowed */
    PyObject *deflt; /* new reference */
} RM;

static void rm_close(RM *r) { Py_CLEAR(r->deflt); }

/* Open ``map`` for reads and one-page edits (the compiled layout keeps its layout for int64 keys,
   so an edit needs no check).  1: usable; 0: refused (nothing changed). */
static int rm_open(RM *r, PyObject *map, int edit) {
    (void)edit;
    r->map = map;
    r->deflt = NULL;
    if (capi == NULL || !capi->is_native(map)) return 0;
    r->deflt = slot_get(map, off_default); /* kept in step with the core's */
    return r->deflt != NULL;
}

/* RangeMap.get: a new reference. */
static PyObject *rm_get(RM *r, long long index) { return capi->get(r->map, index); }

/* Over the pieces of [start, end) (gaps as the default), in order: ``test(value)`` returns 1 to
   stop with 1, 0 to go on, -1 on error.  ``want`` is passed to test.  Returns 1, 0 or -1. */
typedef int (*piece_test)(PyObject *value, PyObject *want);

static int rm_scan(RM *r, long long start, long long end, piece_test test, PyObject *want) {
    long long pos = start; /* the same maximal pieces segments() yields, in order */
    while (pos < end) {
        int64_t s, e;
        PyObject *v = Py_NewRef(capi->piece(r->map, pos, &s, &e));
        int res = test(v, want);
        Py_DECREF(v);
        if (res) return res;
        pos = e;
    }
    return 0;
}

static int differs(PyObject *v, PyObject *want) {
    int eq = PyObject_RichCompareBool(v, want, Py_EQ);
    return eq < 0 ? -1 : !eq;
}

static int truthy(PyObject *v, PyObject *want) {
    (void)want;
    return PyObject_IsTrue(v);
}

/* RangeMap.all_equal(start, end, value): 1, 0 or -1. */
static int rm_all_equal(RM *r, long long start, long long end, PyObject *value) {
    int res = rm_scan(r, start, end, differs, value);
    return res < 0 ? -1 : !res;
}

/* RangeMap.any_match(start, end, bool): 1, 0 or -1. */
static int rm_any_true(RM *r, long long start, long long end) {
    return rm_scan(r, start, end, truthy, NULL);
}

/* RangeMap.set(start, end, value): the core's rule.  0 or -1. */
static int rm_set(RM *r, long long start, long long end, PyObject *value) {
    return capi->set(r->map, start, end, value);
}

/* ---- small helpers ------------------------------------------------------------------------------ */

/* The lock methods this module calls, taken from their types once (module init): a call through
   the descriptor skips the per-call method lookup.  Other lock types go the general way. */
static PyObject *LockType, *RLockType, *lock_locked, *rlock_acquire, *rlock_release;

static PyObject *call_lock_method(PyObject *lock, PyObject *type, PyObject *descr, PyObject *name,
                                  PyObject *arg) {
    PyObject *args[2] = {lock, arg};
    if (descr != NULL && (PyObject *)Py_TYPE(lock) == type)
        return PyObject_Vectorcall(descr, args, arg ? 2 : 1, NULL);
    return arg ? PyObject_CallMethodOneArg(lock, name, arg) : PyObject_CallMethodNoArgs(lock, name);
}

/* An attribute that must be an exact int within long long: 1 with *out set, 0 refused, -1 error. */
static int get_ll(PyObject *obj, PyObject *name, long long *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL) {
        PyErr_Clear();
        return 0;
    }
    int ok = 0;
    if (PyLong_CheckExact(v)) {
        int overflow;
        *out = PyLong_AsLongLongAndOverflow(v, &overflow);
        ok = !overflow;
    }
    Py_DECREF(v);
    return ok;
}

static int set_ll(PyObject *obj, PyObject *name, long long value) {
    PyObject *v = PyLong_FromLongLong(value);
    if (v == NULL) return -1;
    int rc = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return rc;
}

static int named_locks_free(PyObject *owner, PyObject *const *lock_names, int nlocks);

/* No explorer installed, this thread holds no named lock, and nobody holds ``lock_names``' locks of
   ``owner``: what lets an entry act as if it took and released them in one step. */
static int no_locks_held(PyObject *owner, PyObject *const *lock_names, int nlocks) {
    PyObject *ex = PyDict_GetItemWithError(SyncDict, s_explorer);
    if (ex != Py_None) {
        PyErr_Clear();
        return 0;
    }
    PyObject *stack = PyObject_GetAttr(Held, s_stack);
    if (stack == NULL) {
        PyErr_Clear();
        return 0;
    }
    int empty = PyList_CheckExact(stack) && PyList_GET_SIZE(stack) == 0;
    Py_DECREF(stack);
    if (!empty) return 0;
    return named_locks_free(owner, lock_names, nlocks);
}

/* Nobody holds these NamedLocks of ``owner`` (their threading.Lock is not locked). */
static int named_locks_free(PyObject *owner, PyObject *const *lock_names, int nlocks) {
    for (int i = 0; i < nlocks; i++) {
        PyObject *named = PyObject_GetAttr(owner, lock_names[i]);
        PyObject *raw = named ? PyObject_GetAttr(named, s_lock) : NULL;
        Py_XDECREF(named);
        PyObject *locked = raw ? call_lock_method(raw, LockType, lock_locked, s_locked, NULL) : NULL;
        Py_XDECREF(raw);
        if (locked != Py_False) {
            Py_XDECREF(locked);
            PyErr_Clear();
            return 0;
        }
        Py_DECREF(locked);
    }
    return 1;
}

/* stats[key] += 1 on a dict (a Counter's missing key counts as 0, as Counter.__missing__ says). */
static int bump(PyObject *stats, PyObject *key) {
    PyObject *old = PyDict_GetItemWithError(stats, key);
    if (old == NULL && PyErr_Occurred()) return -1;
    PyObject *one = PyLong_FromLong(1);
    PyObject *nv = old ? PyNumber_Add(old, one) : Py_NewRef(one);
    Py_DECREF(one);
    if (nv == NULL) return -1;
    int rc = PyDict_SetItem(stats, key, nv);
    Py_DECREF(nv);
    return rc;
}

/* ---- KVM_SET_MEMORY_ATTRIBUTES, one page ------------------------------------------------------ */

typedef struct {
    PyObject *slot; /* new reference */
    long long base, end;
    RM sptes;       /* only checked: nothing mapped at the gfn */
    PyObject *lpage; /* the slot's lpage_mixed dict, new reference */
    RM mixed[2];     /* orders 9 and 18; deflt NULL when the slot has none */
} Target;

static const int ORDERS[2] = {9, 18};

/* The invalidation state of the MMU, edited locally and written back at the end. */
typedef struct {
    long long in_progress, range_start, range_end, seq;
} Inval;

/* Write back an MMU's invalidation state: only the fields whose value changed (the Python path
   stores an equal int where it adds and subtracts one; nothing can tell the two apart). */
static int store_inval(PyObject *mmu, const Inval *before, const Inval *after) {
    if (after->in_progress != before->in_progress && set_ll(mmu, s_in_progress, after->in_progress)) return -1;
    if (after->range_start != before->range_start && set_ll(mmu, s_range_start, after->range_start)) return -1;
    if (after->range_end != before->range_end && set_ll(mmu, s_range_end, after->range_end)) return -1;
    if (after->seq != before->seq && set_ll(mmu, s_seq, after->seq)) return -1;
    return 0;
}

static void range_add(Inval *v, long long start, long long end) {
    if (v->range_start == -1) {
        v->range_start = start;
        v->range_end = end;
    } else {
        if (start < v->range_start) v->range_start = start;
        if (end > v->range_end) v->range_end = end;
    }
}

/* Lookups the Python path makes on a MIXED map: a missing map reads as "not mixed". */
static int mixed_at(RM *r, long long hp) {
    if (r->deflt == NULL) return 0; /* not opened: the slot has no such map */
    PyObject *v = rm_get(r, hp);
    if (v == NULL) return -1;
    int t = PyObject_IsTrue(v);
    Py_DECREF(v);
    return t;
}

static PyObject *set_attributes_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "set_attributes_one(vm, address, size, attributes, flags)");
        return NULL;
    }
    PyObject *vm = args[0], *address = args[1], *size = args[2], *attributes = args[3], *flags = args[4];
    if (PageCacheType == NULL) return NI(); /* not configured yet */
    /* Arguments: exact ints of the common case only (guestmem.args' rules stay the Python path's). */
    if (!PyLong_CheckExact(address) || !PyLong_CheckExact(size) || !PyLong_CheckExact(attributes) ||
        !PyLong_CheckExact(flags))
        return NI();
    int overflow;
    long long addr = PyLong_AsLongLongAndOverflow(address, &overflow);
    if (overflow || addr < 0 || addr % (long long)PAGE || addr > (LLONG_MAX - (long long)PAGE)) {
        PyErr_Clear();
        return NI();
    }
    long long sz = PyLong_AsLongLongAndOverflow(size, &overflow);
    if (overflow || sz != (long long)PAGE) return NI();
    long long attrs = PyLong_AsLongLongAndOverflow(attributes, &overflow);
    if (overflow || attrs < 0) return NI();
    long long fl = PyLong_AsLongLongAndOverflow(flags, &overflow);
    if (overflow || fl != 0) return NI();
    long long gfn = addr / (long long)PAGE;

    PyObject *system = NULL, *process = NULL, *deferred = NULL, *options = NULL, *o_attr = NULL,
             *o_mattr = NULL, *arch = NULL, *o_priv = NULL, *attrmap_obj = NULL, *cur = NULL,
             *memslots = NULL, *mmu = NULL, *sptes_list = NULL, *stats = NULL, *result = NULL;
    RM amap = {0};
    Target tg[MAX_TARGETS];
    int ntg = 0;
    memset(tg, 0, sizeof tg);
    long long fd;
    int gc_was_on = 0;

    /* ---- preconditions: reads only ---- */
    if (!(system = PyObject_GetAttr(vm, s_system))) goto refuse;
    if (!(process = PyObject_GetAttr(system, s_process))) goto refuse;
    if (!(deferred = PyObject_GetAttr(process, s_deferred))) goto refuse;
    if (PyObject_Length(deferred) != 0) goto refuse; /* run_deferred() would close something */
    if (get_ll(vm, s_fd, &fd) != 1 || fd < 0) goto refuse; /* EBADF: the Python path says so */
    if (!(options = PyObject_GetAttr(system, s_options))) goto refuse;
    if (!(o_attr = PyObject_GetAttr(options, s_attributes)) || !PyUnicode_CheckExact(o_attr) ||
        PyUnicode_Compare(o_attr, s_gmem) == 0)
        goto refuse; /* in-place mode: ENOTTY */
    if (!(o_mattr = PyObject_GetAttr(options, s_memory_attributes)) || o_mattr != Py_True) goto refuse;
    if (!(arch = PyObject_GetAttr(vm, s_arch))) goto refuse;
    if (!(o_priv = PyObject_GetAttr(arch, s_has_private_mem))) goto refuse;
    int priv = PyObject_IsTrue(o_priv);
    if (priv < 0) goto refuse;
    if (attrs & ~(long long)(priv ? ATTR_PRIVATE : 0)) goto refuse; /* EINVAL */
    {
        PyObject *names[2] = {s_slots_lock, s_mmu_lock};
        if (!no_locks_held(vm, names, 2)) goto refuse;
    }
    gc_was_on = PyGC_Disable(); /* no finalizer (Python code) may run from here on */
    if (!(attrmap_obj = PyObject_GetAttr(vm, s_attributes))) goto refuse;
    if (rm_open(&amap, attrmap_obj, 1) != 1) goto refuse;
    if (!(cur = rm_get(&amap, gfn))) goto error;
    int same = PyObject_RichCompareBool(cur, attributes, Py_EQ);
    if (same < 0) goto error;
    if (same) { /* nothing changes: the early return (no invalidation, no count) */
        result = Py_NewRef(Py_None);
        goto out;
    }
    if (!(memslots = PyObject_GetAttr(vm, s_memslots)) || !PyList_CheckExact(memslots)) goto refuse;
    if (!(stats = PyObject_GetAttr(system, s_stats)) || !PyDict_Check(stats)) goto refuse;
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(memslots); k++) {
        PyObject *ms = PyList_GET_ITEM(memslots, k);
        PyObject *by_gfn = PyObject_GetAttr(ms, s_by_gfn);
        if (by_gfn == NULL) goto refuse;
        RM r;
        int ok = rm_open(&r, by_gfn, 0);
        Py_DECREF(by_gfn);
        if (ok != 1) goto refuse;
        PyObject *sid = rm_get(&r, gfn);
        rm_close(&r);
        if (sid == NULL) goto error;
        if (sid == Py_None) {
            Py_DECREF(sid);
            continue;
        }
        PyObject *by_id = PyObject_GetAttr(ms, s_by_id);
        PyObject *slot = (by_id && PyDict_CheckExact(by_id)) ? PyDict_GetItemWithError(by_id, sid) : NULL;
        Py_XINCREF(slot);
        Py_XDECREF(by_id);
        Py_DECREF(sid);
        if (slot == NULL || ntg == MAX_TARGETS) {
            Py_XDECREF(slot);
            goto refuse;
        }
        tg[ntg++].slot = slot;
    }
    if (ntg) {
        if (!(mmu = PyObject_GetAttr(vm, s_mmu))) goto refuse;
        if (!(sptes_list = PyObject_GetAttr(mmu, s_sptes)) || !PyList_CheckExact(sptes_list)) goto refuse;
    }
    for (int k = 0; k < ntg; k++) {
        Target *t = &tg[k];
        long long as_id, npages;
        if (get_ll(t->slot, s_as_id, &as_id) != 1 || get_ll(t->slot, s_base_gfn, &t->base) != 1 ||
            get_ll(t->slot, s_npages, &npages) != 1)
            goto refuse;
        t->end = t->base + npages;
        if (as_id < 0 || as_id >= PyList_GET_SIZE(sptes_list)) goto refuse;
        if (rm_open(&t->sptes, PyList_GET_ITEM(sptes_list, as_id), 0) != 1) goto refuse;
        PyObject *sp = rm_get(&t->sptes, gfn);
        if (sp == NULL) goto error;
        int mapped = sp != Py_None;
        Py_DECREF(sp);
        if (mapped) goto refuse; /* an SPTE to zap: the Python path (arch hooks, CPU view) */
        if (!(t->lpage = PyObject_GetAttr(t->slot, s_lpage_mixed)) || !PyDict_CheckExact(t->lpage)) goto refuse;
        for (int o = 0; o < 2; o++) {
            PyObject *m = PyDict_GetItemWithError(t->lpage, o ? s_eighteen : s_nine);
            if (m == NULL) {
                if (PyErr_Occurred()) goto error;
                continue;
            }
            if (rm_open(&t->mixed[o], m, 1) != 1) goto refuse;
        }
    }
    /* Every map is of a known layout with room, the values are ints and bools, the SPTEs hold
       nothing to zap: from here on no Python code runs and nothing can refuse. */
    Inval inv = {0, 0, 0, 0};
    if (ntg) {
        if (get_ll(mmu, s_in_progress, &inv.in_progress) != 1 || get_ll(mmu, s_range_start, &inv.range_start) != 1 ||
            get_ll(mmu, s_range_end, &inv.range_end) != 1 || get_ll(mmu, s_seq, &inv.seq) != 1)
            goto refuse;
    }

    Inval inv0 = inv;
    /* ---- the change: attributes.apply_vm_attributes' steps, in its order ---- */
    if (!ntg) {
        if (rm_set(&amap, gfn, gfn + 1, attributes)) goto error;
        if (bump(stats, s_conversions)) goto error;
        result = Py_NewRef(Py_None);
        goto out;
    }
    /* invalidate_begin */
    inv.in_progress += 1;
    if (inv.in_progress == 1) inv.range_start = inv.range_end = -1;
    for (int k = 0; k < ntg; k++) {
        Target *t = &tg[k];
        range_add(&inv, gfn, gfn + 1);
        /* pre_set_attributes_range_add for [gfn, gfn + 1): the head hugepage is the tail one */
        for (int o = 0; o < 2; o++) {
            long long size = 1LL << ORDERS[o], hs = gfn >> ORDERS[o] << ORDERS[o];
            if (hs >= t->base && hs + size <= t->end) {
                int mixed = mixed_at(&t->mixed[o], hs >> ORDERS[o]);
                if (mixed < 0) goto error;
                if (!mixed) range_add(&inv, hs, hs + size);
            }
        }
        /* unmap_gfn_range: the range, then a zap that finds nothing mapped at the gfn */
        range_add(&inv, gfn, gfn + 1);
    }
    if (rm_set(&amap, gfn, gfn + 1, attributes)) goto error;
    for (int k = 0; k < ntg; k++) {
        Target *t = &tg[k];
        /* post_set_attributes for [gfn, gfn + 1): only the head hugepage of each order is
           recomputed (no hugepage lies wholly inside one page) */
        for (int o = 0; o < 2; o++) {
            if (t->mixed[o].deflt == NULL) continue;
            int order = ORDERS[o];
            long long size = 1LL << order, hs = gfn >> order << order;
            if (!(hs >= t->base && hs + size <= t->end)) continue;
            int has;
            if (order == 9) {
                has = rm_all_equal(&amap, hs, hs + size, attributes);
            } else {
                /* hugepage_has_attrs at 1 GiB: no MIXED 2 MiB part (as it is now), then all equal */
                PyObject *sub = PyDict_GetItemWithError(t->lpage, s_nine);
                if (sub == NULL && PyErr_Occurred()) goto error;
                has = 1;
                if (sub != NULL) {
                    int any = rm_any_true(&t->mixed[0], hs >> 9, (hs + size) >> 9);
                    if (any < 0) goto error;
                    if (any) has = 0;
                }
                if (has) has = rm_all_equal(&amap, hs, hs + size, attributes);
            }
            if (has < 0) goto error;
            PyObject *value = has ? Py_False : Py_True; /* MIXED = not has_attrs */
            PyObject *now = rm_get(&t->mixed[o], hs >> order);
            if (now == NULL) goto error;
            int ne = PyObject_RichCompareBool(now, value, Py_NE);
            Py_DECREF(now);
            if (ne < 0) goto error;
            if (ne && rm_set(&t->mixed[o], hs >> order, (hs >> order) + 1, value)) goto error;
        }
    }
    /* invalidate_end */
    inv.seq += 1;
    inv.in_progress -= 1;
    if (store_inval(mmu, &inv0, &inv)) goto error;
    if (bump(stats, s_conversions)) goto error;
    result = Py_NewRef(Py_None);
    goto out;

refuse:
    if (PyErr_Occurred()) PyErr_Clear();
    result = NI();
    goto out;
error:
    result = NULL;
out:
    if (gc_was_on) PyGC_Enable();
    for (int k = 0; k < MAX_TARGETS; k++) {
        Py_XDECREF(tg[k].slot);
        Py_XDECREF(tg[k].lpage);
        rm_close(&tg[k].sptes);
        rm_close(&tg[k].mixed[0]);
        rm_close(&tg[k].mixed[1]);
    }
    rm_close(&amap);
    Py_XDECREF(system);
    Py_XDECREF(process);
    Py_XDECREF(deferred);
    Py_XDECREF(options);
    Py_XDECREF(o_attr);
    Py_XDECREF(o_mattr);
    Py_XDECREF(arch);
    Py_XDECREF(o_priv);
    Py_XDECREF(attrmap_obj);
    Py_XDECREF(cur);
    Py_XDECREF(memslots);
    Py_XDECREF(mmu);
    Py_XDECREF(sptes_list);
    Py_XDECREF(stats);
    return result;
}

/* ---- madvise(MADV_REMOVE) of one page of a shared shmem mapping ---------------------------------- */

#define MADV_REMOVE_ADVICE 9
#define MAX_MAPS 8
#define MAX_VMS 8
#define MAX_RANGES (MAX_MAPS)
#define MAX_SLOTS 64

/* A lock nobody holds (or this thread holds re-entrantly): taken and given back at once, which,
   with the GIL held and no Python code run until the entry returns, is the whole critical section. */
static int lock_free(PyObject *owner, PyObject *name) {
    PyObject *lock = PyObject_GetAttr(owner, name);
    if (lock == NULL) {
        PyErr_Clear();
        return 0;
    }
    PyObject *got = call_lock_method(lock, RLockType, rlock_acquire, s_acquire, Py_False);
    int ok = got == Py_True;
    Py_XDECREF(got);
    if (ok) {
        PyObject *r = call_lock_method(lock, RLockType, rlock_release, s_release, NULL);
        if (r == NULL) ok = 0;
        Py_XDECREF(r);
    }
    Py_DECREF(lock);
    if (PyErr_Occurred()) PyErr_Clear();
    return ok;
}

typedef struct {
    PyObject *vm; /* new reference */
    PyObject *mmu;
    Inval inv0, inv; /* as read, as it will be */
} VmNote;

static PyObject *discard_one(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "discard_one(mapping, offset, length, advice)");
        return NULL;
    }
    PyObject *mp = args[0], *offset = args[1], *length = args[2], *advice = args[3];
    if (PageCacheType == NULL) return NI(); /* not configured yet */
    if (!PyLong_CheckExact(offset) || !PyLong_CheckExact(length) || !PyLong_CheckExact(advice)) return NI();
    int overflow;
    long adv = PyLong_AsLongAndOverflow(advice, &overflow);
    if (overflow || adv != MADV_REMOVE_ADVICE) return NI();
    long long off = PyLong_AsLongLongAndOverflow(offset, &overflow);
    if (overflow || off < 0 || off % (long long)PAGE || off > LLONG_MAX / 2) return NI();
    long long len = PyLong_AsLongLongAndOverflow(length, &overflow);
    if (overflow || len <= 0 || len > (long long)PAGE) return NI(); /* rounds up to one page */

    PyObject *process = NULL, *deferred = NULL, *file = NULL, *by_file = NULL, *mappings = NULL,
             *fid = NULL, *ids = NULL, *it = NULL, *notifiers = NULL, *cache = NULL, *result = NULL;
    PyObject *maps[MAX_MAPS] = {0};
    RM mapped[MAX_MAPS];
    long long mpage[MAX_MAPS];
    long long ra[MAX_RANGES], rb[MAX_RANGES];
    int nmaps = 0, nranges = 0, nvms = 0;
    VmNote vms[MAX_VMS];
    memset(mapped, 0, sizeof mapped);
    memset(vms, 0, sizeof vms);
    long long mlen, pgoff;
    int gc_was_on = 0;

    if (!(process = PyObject_GetAttr(mp, s_process))) goto refuse;
    if (!(deferred = PyObject_GetAttr(process, s_deferred)) || PyObject_Length(deferred) != 0) goto refuse;
    {
        PyObject *closed = PyObject_GetAttr(mp, s_closed), *shared = PyObject_GetAttr(mp, s_shared);
        int ok = closed == Py_False && shared == Py_True; /* EBADF / EACCES / EINVAL otherwise */
        Py_XDECREF(closed);
        Py_XDECREF(shared);
        if (!ok) goto refuse;
    }
    if (get_ll(mp, s_length, &mlen) != 1 || get_ll(mp, s_pgoff, &pgoff) != 1 || mlen < 0) goto refuse;
    if (off + (long long)PAGE > (mlen + (long long)PAGE - 1) / (long long)PAGE * (long long)PAGE) goto refuse;
    if (!(file = PyObject_GetAttr(mp, s_file)) || (PyObject *)Py_TYPE(file) != ShmemType) goto refuse;
    if (!(cache = PyObject_GetAttr(file, s_cache)) || (PyObject *)Py_TYPE(cache) != PageCacheType) goto refuse;
    long long start = pgoff + off / (long long)PAGE, end = start + 1;
    if (!no_locks_held(mp, NULL, 0)) goto refuse;
    gc_was_on = PyGC_Disable(); /* no finalizer (Python code) may run from here on */
    if (!lock_free(process, s_lock) || !lock_free(cache, s_lock)) goto refuse;

    /* page cache: remove()'s early return (a hole with nothing recorded), or the Python path */
    {
        static PyObject **names[4] = {&s__delta, &s__order, &s__uptodate, &s__refs};
        for (int k = 0; k < 4; k++) {
            PyObject *m = PyObject_GetAttr(cache, *names[k]);
            if (m == NULL) goto refuse;
            RM r;
            int ok = rm_open(&r, m, 0);
            Py_DECREF(m);
            if (ok != 1) goto refuse;
            PyObject *v = rm_get(&r, start);
            rm_close(&r);
            if (v == NULL) goto error;
            int t = k == 0 ? v != Py_None : PyObject_IsTrue(v);
            Py_DECREF(v);
            if (t != 0) goto refuse; /* pages to free (or an error): the Python path */
        }
    }
    /* every mapping of the file (the process's index by file) */
    if (!(by_file = PyObject_GetAttr(process, s_by_file)) || !PyDict_CheckExact(by_file)) goto refuse;
    if (!(mappings = PyObject_GetAttr(process, s_mappings)) || !PyDict_CheckExact(mappings)) goto refuse;
    if (!(fid = PyLong_FromVoidPtr(file))) goto error;
    ids = PyDict_GetItemWithError(by_file, fid);
    if (ids == NULL && PyErr_Occurred()) goto error;
    if (ids != NULL) {
        Py_INCREF(ids);
        if (!PyAnySet_CheckExact(ids)) goto refuse;
        if (!(it = PyObject_GetIter(ids))) goto error;
        PyObject *mid;
        while ((mid = PyIter_Next(it)) != NULL) {
            PyObject *ref = PyDict_GetItemWithError(mappings, mid);
            Py_DECREF(mid);
            if (ref == NULL) {
                if (PyErr_Occurred()) goto error;
                continue;
            }
            if (!PyWeakref_CheckRefExact(ref)) goto refuse;
            PyObject *m = PyWeakref_GetObject(ref);
            if (m == Py_None) continue;
            PyObject *mf = PyObject_GetAttr(m, s_file);
            Py_XDECREF(mf);
            if (mf != file) continue;
            long long ml = mlen, mpg = pgoff, maddr;
            if ((m != mp && (get_ll(m, s_length, &ml) != 1 || get_ll(m, s_pgoff, &mpg) != 1)) ||
                get_ll(m, s_addr, &maddr) != 1)
                goto refuse;
            long long npages = (ml + (long long)PAGE - 1) / (long long)PAGE;
            long long a = start > mpg ? start : mpg, b = end < mpg + npages ? end : mpg + npages;
            if (a >= b) continue;
            if (nranges == MAX_RANGES || nmaps == MAX_MAPS) goto refuse;
            ra[nranges] = maddr + (a - mpg) * (long long)PAGE;
            rb[nranges] = maddr + (b - mpg) * (long long)PAGE;
            nranges++;
            PyObject *shared = PyObject_GetAttr(m, s_shared);
            if (shared == NULL) goto refuse;
            int sh = PyObject_IsTrue(shared);
            Py_DECREF(shared);
            if (sh < 0) goto refuse;
            if (sh) { /* unmap_mapping_range: this mapping's PTE goes */
                PyObject *mm = PyObject_GetAttr(m, s_mapped);
                if (mm == NULL) goto refuse;
                int ok = rm_open(&mapped[nmaps], mm, 1);
                Py_DECREF(mm);
                if (ok != 1) goto refuse;
                maps[nmaps] = Py_NewRef(m);
                mpage[nmaps] = a - mpg;
                nmaps++;
            }
        }
        if (PyErr_Occurred()) goto error;
    }
    /* the MMU notifiers (KVM VMs only), each told of each range */
    if (nranges) {
        if (!(notifiers = PyObject_GetAttr(process, s_notifiers)) || !PyList_CheckExact(notifiers)) goto refuse;
        for (Py_ssize_t k = 0; k < PyList_GET_SIZE(notifiers); k++) {
            PyObject *ref = PyList_GET_ITEM(notifiers, k);
            if (!PyWeakref_CheckRefExact(ref)) goto refuse;
            PyObject *vm = PyWeakref_GetObject(ref);
            if (vm == Py_None) continue;
            if ((PyObject *)Py_TYPE(vm) != VmType || nvms == MAX_VMS) goto refuse;
            VmNote *vn = &vms[nvms++];
            vn->vm = Py_NewRef(vm);
            PyObject *names[1] = {s_mmu_lock};
            if (!named_locks_free(vm, names, 1)) goto refuse; /* (explorer and this thread: above) */
            if (!(vn->mmu = PyObject_GetAttr(vm, s_mmu))) goto refuse;
            if (get_ll(vn->mmu, s_in_progress, &vn->inv.in_progress) != 1 ||
                get_ll(vn->mmu, s_range_start, &vn->inv.range_start) != 1 ||
                get_ll(vn->mmu, s_range_end, &vn->inv.range_end) != 1 || get_ll(vn->mmu, s_seq, &vn->inv.seq) != 1)
                goto refuse;
            vn->inv0 = vn->inv;
        }
    }
    /* Simulate each VM's invalidate_range_start/end pairs (vm.py), refusing an SPTE to zap. */
    for (int v = 0; v < nvms; v++) {
        VmNote *vn = &vms[v];
        PyObject *memslots = PyObject_GetAttr(vn->vm, s_memslots);
        PyObject *sptes = vn->mmu ? PyObject_GetAttr(vn->mmu, s_sptes) : NULL;
        int ok = memslots && sptes && PyList_CheckExact(memslots) && PyList_CheckExact(sptes);
        int begun[MAX_RANGES];
        for (int r = 0; ok && r < nranges; r++) {
            int targets = 0;
            for (Py_ssize_t k = 0; ok && k < PyList_GET_SIZE(memslots); k++) {
                PyObject *by_id = PyObject_GetAttr(PyList_GET_ITEM(memslots, k), s_by_id);
                if (by_id == NULL || !PyDict_CheckExact(by_id)) {
                    Py_XDECREF(by_id);
                    ok = 0;
                    break;
                }
                Py_ssize_t pos = 0;
                PyObject *key, *slot;
                while (ok && PyDict_Next(by_id, &pos, &key, &slot)) {
                    long long hva, np, base, as_id;
                    if (get_ll(slot, s_userspace_addr, &hva) != 1 || get_ll(slot, s_npages, &np) != 1 ||
                        get_ll(slot, s_base_gfn, &base) != 1 || get_ll(slot, s_as_id, &as_id) != 1) {
                        ok = 0;
                        break;
                    }
                    long long a = ra[r] > hva ? ra[r] : hva, e_hva = hva + np * (long long)PAGE;
                    long long b = rb[r] < e_hva ? rb[r] : e_hva;
                    if (a >= b) continue;
                    long long g0 = base + (a - hva) / (long long)PAGE;
                    long long g1 = base + (b - hva + (long long)PAGE - 1) / (long long)PAGE;
                    if (g1 != g0 + 1 || as_id < 0 || as_id >= PyList_GET_SIZE(sptes)) {
                        ok = 0;
                        break;
                    }
                    RM sr;
                    if (rm_open(&sr, PyList_GET_ITEM(sptes, as_id), 0) != 1) {
                        ok = 0;
                        break;
                    }
                    PyObject *sp = rm_get(&sr, g0);
                    rm_close(&sr);
                    if (sp == NULL || sp != Py_None) ok = 0; /* something to zap: the Python path */
                    Py_XDECREF(sp);
                    if (!ok) break;
                    if (!targets) { /* invalidate_begin, once per range with targets */
                        vn->inv.in_progress += 1;
                        if (vn->inv.in_progress == 1) vn->inv.range_start = vn->inv.range_end = -1;
                    }
                    targets++;
                    range_add(&vn->inv, g0, g1);
                }
                Py_DECREF(by_id);
            }
            begun[r] = targets > 0;
        }
        /* invalidate_range_end, once per range: pops what the starts pushed, last first */
        for (int r = 0; ok && r < nranges; r++) {
            if (begun[nranges - 1 - r]) {
                vn->inv.seq += 1;
                vn->inv.in_progress -= 1;
            }
        }
        Py_XDECREF(memslots);
        Py_XDECREF(sptes);
        if (PyErr_Occurred()) goto error;
        if (!ok) goto refuse;
    }

    /* ---- the change: no Python code from here ---- */
    for (int k = 0; k < nmaps; k++)
        if (rm_set(&mapped[k], mpage[k], mpage[k] + 1, Py_False)) goto error;
    for (int v = 0; v < nvms; v++) {
        VmNote *vn = &vms[v];
        if (store_inval(vn->mmu, &vn->inv0, &vn->inv)) goto error;
    }
    result = Py_NewRef(Py_None);
    goto out;

refuse:
    if (PyErr_Occurred()) PyErr_Clear();
    result = NI();
    goto out;
error:
    result = NULL;
out:
    if (gc_was_on) PyGC_Enable();
    for (int k = 0; k < MAX_MAPS; k++) {
        Py_XDECREF(maps[k]);
        rm_close(&mapped[k]);
    }
    for (int v = 0; v < MAX_VMS; v++) {
        Py_XDECREF(vms[v].vm);
        Py_XDECREF(vms[v].mmu);
    }
    Py_XDECREF(process);
    Py_XDECREF(deferred);
    Py_XDECREF(file);
    Py_XDECREF(cache);
    Py_XDECREF(by_file);
    Py_XDECREF(mappings);
    Py_XDECREF(fid);
    Py_XDECREF(ids);
    Py_XDECREF(it);
    Py_XDECREF(notifiers);
    return result;
}

/* ---- module ------------------------------------------------------------------------------------- */

static PyObject *configure(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError,
                        "configure(flat_type, native_type, ranges, sync, held, vm_type, shmem_type, pagecache_type)");
        return NULL;
    }
    if (!PyType_Check(args[0]) || !PyModule_Check(args[2]) || !PyModule_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "configure: types and modules expected");
        return NULL;
    }
    {
        PyObject *d = PyDict_GetItemWithError(((PyTypeObject *)args[0])->tp_dict, s_default);
        if (d == NULL || Py_TYPE(d) != &PyMemberDescr_Type ||
            ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "configure: 'default' is not a __slots__ member of RangeMap");
            return NULL;
        }
        off_default = ((PyMemberDescrObject *)d)->d_member->offset;
    }
    /* The compiled layout's C API, when the core is built (else no map has that layout). */
    capi = NULL;
    if (args[1] != Py_None) {
        const RangeMapCAPI *api = PyCapsule_Import("guestmem._rangemap._C_API", 0);
        if (api == NULL)
            PyErr_Clear();
        else if (api->abi == GUESTMEM_RANGEMAP_CAPI_ABI)
            capi = api;
    }
    Py_XSETREF(SyncDict, Py_NewRef(PyModule_GetDict(args[3])));
    Py_XSETREF(Held, Py_NewRef(args[4]));
    Py_XSETREF(VmType, Py_NewRef(args[5]));
    Py_XSETREF(ShmemType, Py_NewRef(args[6]));
    Py_XSETREF(PageCacheType, Py_NewRef(args[7]));
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"configure", (PyCFunction)(void (*)(void))configure, METH_FASTCALL,
     "configure(flat_type, native_type, ranges_module, sync_module, held, vm_type, shmem_type, "
     "pagecache_type): what the entries look at"},
    {"set_attributes_one", (PyCFunction)(void (*)(void))set_attributes_one, METH_FASTCALL,
     "set_attributes_one(vm, address, size, attributes, flags) -> None, or NotImplemented when the "
     "Python path must run"},
    {"discard_one", (PyCFunction)(void (*)(void))discard_one, METH_FASTCALL,
     "discard_one(mapping, offset, length, advice) -> None, or NotImplemented when the Python path "
     "must run"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastconv",
                                    "One-page conversion steps of the model, compiled (an accelerator).", -1,
                                    methods, NULL, NULL, NULL, NULL};

#define INTERN(var, text)                                                                              \
    do {                                                                                               \
        if (!(var = PyUnicode_InternFromString(text))) return NULL;                                    \
    } while (0)

PyMODINIT_FUNC PyInit__fastconv(void) {
    INTERN(s_default, "default");
    INTERN(s_explorer, "_explorer");
    INTERN(s_stack, "stack");
    INTERN(s_system, "system");
    INTERN(s_process, "process");
    INTERN(s_deferred, "_deferred");
    INTERN(s_fd, "fd");
    INTERN(s_options, "options");
    INTERN(s_attributes, "attributes");
    INTERN(s_memory_attributes, "memory_attributes");
    INTERN(s_arch, "arch");
    INTERN(s_has_private_mem, "has_private_mem");
    INTERN(s_slots_lock, "slots_lock");
    INTERN(s_mmu_lock, "mmu_lock");
    INTERN(s_lock, "_lock");
    INTERN(s_locked, "locked");
    INTERN(s_memslots, "memslots");
    INTERN(s_by_gfn, "by_gfn");
    INTERN(s_by_id, "by_id");
    INTERN(s_mmu, "mmu");
    INTERN(s_sptes, "sptes");
    INTERN(s_as_id, "as_id");
    INTERN(s_base_gfn, "base_gfn");
    INTERN(s_npages, "npages");
    INTERN(s_lpage_mixed, "lpage_mixed");
    INTERN(s_stats, "stats");
    INTERN(s_conversions, "conversions");
    INTERN(s_in_progress, "in_progress");
    INTERN(s_range_start, "range_start");
    INTERN(s_range_end, "range_end");
    INTERN(s_seq, "seq");
    INTERN(s_get, "get");
    INTERN(s_set, "set");
    INTERN(s_segments, "segments");
    INTERN(s_gmem, "gmem");
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_closed, "closed");
    INTERN(s_shared, "shared");
    INTERN(s_length, "length");
    INTERN(s_pgoff, "pgoff");
    INTERN(s_file, "file");
    INTERN(s_cache, "cache");
    INTERN(s__delta, "_delta");
    INTERN(s__order, "_order");
    INTERN(s__uptodate, "_uptodate");
    INTERN(s__refs, "_refs");
    INTERN(s_by_file, "_by_file");
    INTERN(s_mappings, "_mappings");
    INTERN(s_addr, "addr");
    INTERN(s_mapped, "mapped");
    INTERN(s_notifiers, "_notifiers");
    INTERN(s_userspace_addr, "userspace_addr");
    if (!(s_nine = PyLong_FromLong(9)) || !(s_eighteen = PyLong_FromLong(18))) return NULL;
    {
        PyObject *thread = PyImport_ImportModule("_thread");
        if (thread == NULL) return NULL;
        PyObject *lock = PyObject_CallMethod(thread, "allocate_lock", NULL);
        RLockType = PyObject_GetAttrString(thread, "RLock");
        Py_DECREF(thread);
        if (lock == NULL || RLockType == NULL) {
            Py_XDECREF(lock);
            return NULL;
        }
        LockType = Py_NewRef((PyObject *)Py_TYPE(lock));
        Py_DECREF(lock);
        lock_locked = PyObject_GetAttr(LockType, s_locked);
        rlock_acquire = PyObject_GetAttr(RLockType, s_acquire);
        rlock_release = PyObject_GetAttr(RLockType, s_release);
        if (!lock_locked || !rlock_acquire || !rlock_release) return NULL;
    }
    return PyModule_Create(&moddef);
}
