/*
 * guestmem.linux._fastioctl: ioctl(fd, request, unsigned long arg) for the ioctls KVM answers in
 * well under a microsecond (KVM_CHECK_EXTENSION, KVM_GET_API_VERSION, ...).
 *
 * Why: through ctypes such a call costs 5-15x the system call itself (argument conversion, and
 * releasing and retaking the GIL around a call that takes ~0.3 us).  This keeps the GIL -- which
 * is only right for calls that cannot block -- and returns the kernel's answer unchanged: the
 * return value, or -errno.  guestmem.linux._sys falls back to ctypes when this is not built.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <sys/ioctl.h>

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

static PyMethodDef methods[] = {
    {"ioctl", (PyCFunction)(void (*)(void))fast_ioctl, METH_FASTCALL,
     "ioctl(fd, request, arg) -> return value, or -errno; holds the GIL (non-blocking ioctls only)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastioctl", NULL, -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastioctl(void) { return PyModule_Create(&module); }
