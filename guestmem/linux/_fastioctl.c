/*
 * guestmem.linux._fastioctl: the kernel backend's path for the ioctls KVM answers in well under a
 * microsecond (KVM_CHECK_EXTENSION, KVM_GET_API_VERSION, ...).
 *
 * Why: through ctypes such a call costs 5-15x the system call itself (argument conversion, and
 * releasing and retaking the GIL around a call that takes ~0.3 us), and even a Python method
 * wrapping a compiled ioctl adds as much again as the kernel takes.  Two pieces, both keeping the
 * GIL -- which is only right for calls that cannot block:
 *
 * - ioctl(fd, request, arg): the raw call; the kernel's return value, or -errno.
 * - IntIoctlMethod(fallback, request, name, takes_arg): a method descriptor for a class whose
 *   instances have ``fd`` and ``_open``.  ``obj.method(arg)`` issues the ioctl straight from C when
 *   the call is the common one (one positional exact int in [0, 2**64), ``obj._open is True``,
 *   ``obj.fd`` an int) and raises ``KvmError(errno, name)`` on failure; every other call (another
 *   argument type or range, keywords, a closed object) goes to ``fallback``, the Python method the
 *   descriptor replaces, so every error and argument rule stays exactly that method's.
 *
 * guestmem.linux._sys falls back to ctypes and plain Python methods when this is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <errno.h>
#include <sys/ioctl.h>

static PyObject *str_open;  /* "_open" */
static PyObject *str_fd;    /* "fd" */
static PyObject *error_type; /* guestmem.errors.KvmError, set by set_error_type() */

static PyObject *fast_ioctl(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "ioctl(fd, request, arg) takes 3 arguments");
        return NULL;
    }
    int fd = (int)PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred()) return NULL;
    unsigned long req = PyLong_AsUnsignedLong(args[1]);
    if (req == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    unsigned long arg = PyLong_AsUnsignedLong(args[2]);
    if (arg == (unsigned long)-1 && PyErr_Occurred()) return NULL;
    int ret = ioctl(fd, req, arg);
    if (ret < 0) ret = -errno;
    return PyLong_FromLong(ret);
}

static PyObject *set_error_type(PyObject *self, PyObject *type) {
    (void)self;
    if (!PyType_Check(type) || !PyType_IsSubtype((PyTypeObject *)type, (PyTypeObject *)PyExc_OSError)) {
        PyErr_SetString(PyExc_TypeError, "the error type must be an OSError subclass");
        return NULL;
    }
    Py_INCREF(type);
    Py_XSETREF(error_type, type);
    Py_RETURN_NONE;
}

typedef struct {
    PyObject_HEAD
    PyObject *fallback;      /* the Python method this replaces: every uncommon call goes there */
    PyObject *name;          /* the operation named in KvmError */
    unsigned long request;
    int takes_arg;           /* 1: obj.m(arg); 0: obj.m() with arg 0 */
    vectorcallfunc vectorcall;
} IntIoctlMethod;

/* The instance's fd if it is open (``_open is True`` and ``fd`` an int), else -1; never raises. */
static int open_fd(PyObject *obj) {
    PyObject *open = PyObject_GetAttr(obj, str_open);
    if (open == NULL) {
        PyErr_Clear();
        return -1;
    }
    int is_open = open == Py_True;
    Py_DECREF(open);
    if (!is_open) return -1;
    PyObject *fdobj = PyObject_GetAttr(obj, str_fd);
    if (fdobj == NULL) {
        PyErr_Clear();
        return -1;
    }
    long fd = PyLong_CheckExact(fdobj) ? PyLong_AsLong(fdobj) : -1;
    Py_DECREF(fdobj);
    if (fd == -1 && PyErr_Occurred()) PyErr_Clear();
    return fd < 0 || fd > 0x7fffffff ? -1 : (int)fd;
}

static PyObject *method_vectorcall(PyObject *callable, PyObject *const *args, size_t nargsf,
                                   PyObject *kwnames) {
    IntIoctlMethod *m = (IntIoctlMethod *)callable;
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (kwnames != NULL || nargs != 1 + m->takes_arg || error_type == NULL) goto slow;
    unsigned long arg = 0;
    if (m->takes_arg) {
        if (!PyLong_CheckExact(args[1])) goto slow;
        arg = PyLong_AsUnsignedLong(args[1]);
        if (arg == (unsigned long)-1 && PyErr_Occurred()) {
            PyErr_Clear(); /* negative or past 2**64: the fallback applies the argument rule */
            goto slow;
        }
    }
    int fd = open_fd(args[0]);
    if (fd < 0) goto slow;
    int ret = ioctl(fd, m->request, arg);
    if (ret >= 0) return PyLong_FromLong(ret);
    int err = errno;
    PyObject *exc = PyObject_CallFunction(error_type, "iO", err, m->name);
    if (exc != NULL) {
        PyErr_SetObject(error_type, exc);
        Py_DECREF(exc);
    }
    return NULL;
slow:
    return PyObject_Vectorcall(m->fallback, args, nargsf, kwnames);
}

static PyObject *method_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"fallback", "request", "name", "takes_arg", NULL};
    PyObject *fallback, *name;
    unsigned long request;
    int takes_arg;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OkUp:IntIoctlMethod", kwlist, &fallback, &request,
                                     &name, &takes_arg))
        return NULL;
    if (!PyCallable_Check(fallback)) {
        PyErr_SetString(PyExc_TypeError, "fallback must be callable");
        return NULL;
    }
    IntIoctlMethod *m = (IntIoctlMethod *)type->tp_alloc(type, 0);
    if (m == NULL) return NULL;
    Py_INCREF(fallback);
    Py_INCREF(name);
    m->fallback = fallback;
    m->name = name;
    m->request = request;
    m->takes_arg = takes_arg;
    m->vectorcall = method_vectorcall;
    return (PyObject *)m;
}

static int method_traverse(IntIoctlMethod *m, visitproc visit, void *arg) {
    Py_VISIT(m->fallback);
    Py_VISIT(m->name);
    return 0;
}

static int method_clear(IntIoctlMethod *m) {
    Py_CLEAR(m->fallback);
    Py_CLEAR(m->name);
    return 0;
}

static void method_dealloc(IntIoctlMethod *m) {
    PyObject_GC_UnTrack(m);
    method_clear(m);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

/* obj.method without a call (or with the method-call optimisation unavailable): a bound method. */
static PyObject *method_get(PyObject *self, PyObject *obj, PyObject *type) {
    (void)type;
    if (obj == NULL || obj == Py_None) {
        Py_INCREF(self);
        return self;
    }
    return PyMethod_New(self, obj);
}

/* __doc__, __name__, __qualname__, __module__ ... are the fallback's. */
static PyObject *method_getattro(PyObject *self, PyObject *attr) {
    PyObject *found = PyObject_GenericGetAttr(self, attr);
    if (found != NULL || !PyErr_ExceptionMatches(PyExc_AttributeError)) return found;
    PyErr_Clear();
    return PyObject_GetAttr(((IntIoctlMethod *)self)->fallback, attr);
}

static PyObject *method_repr(IntIoctlMethod *m) {
    return PyUnicode_FromFormat("<IntIoctlMethod %U over %R>", m->name, m->fallback);
}

static PyObject *method_doc(IntIoctlMethod *m, void *closure) {
    (void)closure;
    return PyObject_GetAttrString(m->fallback, "__doc__");
}

static PyGetSetDef method_getset[] = {
    {"__doc__", (getter)method_doc, NULL, "the Python method's docstring", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef method_members[] = {
    {"__wrapped__", T_OBJECT, offsetof(IntIoctlMethod, fallback), READONLY, "the Python method"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject IntIoctlMethodType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "guestmem.linux._fastioctl.IntIoctlMethod",
    .tp_basicsize = sizeof(IntIoctlMethod),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL |
                Py_TPFLAGS_METHOD_DESCRIPTOR,
    .tp_doc = "IntIoctlMethod(fallback, request, name, takes_arg): a method issuing one non-blocking "
              "integer ioctl from C, the Python ``fallback`` for every uncommon call.",
    .tp_new = method_new,
    .tp_dealloc = (destructor)method_dealloc,
    .tp_traverse = (traverseproc)method_traverse,
    .tp_clear = (inquiry)method_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(IntIoctlMethod, vectorcall),
    .tp_descr_get = method_get,
    .tp_getattro = method_getattro,
    .tp_repr = (reprfunc)method_repr,
    .tp_members = method_members,
    .tp_getset = method_getset,
};

static PyMethodDef methods[] = {
    {"ioctl", (PyCFunction)(void (*)(void))fast_ioctl, METH_FASTCALL,
     "ioctl(fd, request, arg) -> return value, or -errno; holds the GIL (non-blocking ioctls only)."},
    {"set_error_type", set_error_type, METH_O,
     "set_error_type(KvmError): the exception IntIoctlMethod raises, called as KvmError(errno, name)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastioctl", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastioctl(void) {
    str_open = PyUnicode_InternFromString("_open");
    str_fd = PyUnicode_InternFromString("fd");
    if (str_open == NULL || str_fd == NULL || PyType_Ready(&IntIoctlMethodType) < 0) return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL) return NULL;
    Py_INCREF(&IntIoctlMethodType);
    if (PyModule_AddObject(mod, "IntIoctlMethod", (PyObject *)&IntIoctlMethodType) < 0) {
        Py_DECREF(&IntIoctlMethodType);
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
