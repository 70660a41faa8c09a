/*
 * The counter steps of `cluster.local.policies.sketch.FrequencySketch`, compiled.
 *
 * Each miss of a W-TinyLFU cache records a sighting in the sketch: four counter reads, a minimum
 * and up to four writes. In CPython that is about a hundred bytecodes, a fifth of the whole
 * miss; here it is one call. The steps are exactly those of the pure-Python fallback in
 * sketch.py (`_add_python`, `_estimate_python`, `_raise_python`), which a unit test checks
 * against this module on random inputs:
 *
 *   rows   a list or tuple of four bytearrays of equal width (a power of two), one counter
 *          (0..15) per byte;
 *   mask   width - 1;
 *   h      the key's 64-bit sketch hash; row k reads index (a + k*b) & mask, with a the low 28
 *          bits of h and b its bits 36..63, made odd (double hashing).
 *
 * Arguments are checked (types, a mask within every row, a count within 0..255), so a wrong
 * call raises instead of writing out of bounds.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define MAX_COUNT 15
#define LOW28 ((1ULL << 28) - 1)

/* The four counters of `h`: pointers into the rows. Returns -1 with an exception set. */
static int
counters(PyObject *rows, PyObject *mask_obj, PyObject *hash_obj, unsigned char *out[4])
{
    PyObject **items;
    if (PyList_CheckExact(rows) && PyList_GET_SIZE(rows) == 4) {
        items = ((PyListObject *)rows)->ob_item;
    }
    else if (PyTuple_CheckExact(rows) && PyTuple_GET_SIZE(rows) == 4) {
        items = ((PyTupleObject *)rows)->ob_item;
    }
    else {
        PyErr_SetString(PyExc_TypeError, "rows must be a list or tuple of four bytearrays");
        return -1;
    }
    Py_ssize_t mask = PyLong_AsSsize_t(mask_obj);
    if (mask == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (mask < 0) {
        PyErr_SetString(PyExc_ValueError, "mask must be >= 0");
        return -1;
    }
    unsigned long long h = PyLong_AsUnsignedLongLongMask(hash_obj);
    if (h == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    unsigned long long a = h & LOW28;
    unsigned long long b = (h >> 36) | 1;
    for (int k = 0; k < 4; k++) {
        PyObject *row = items[k];
        if (!PyByteArray_CheckExact(row)) {
            PyErr_SetString(PyExc_TypeError, "rows must be a list or tuple of four bytearrays");
            return -1;
        }
        if (PyByteArray_GET_SIZE(row) <= mask) {
            PyErr_SetString(PyExc_ValueError, "mask reaches past the end of a row");
            return -1;
        }
        Py_ssize_t index = (Py_ssize_t)((a + (unsigned long long)k * b) & (unsigned long long)mask);
        out[k] = (unsigned char *)PyByteArray_AS_STRING(row) + index;
    }
    return 0;
}

static unsigned char
minimum(unsigned char *c[4])
{
    unsigned char low = *c[0];
    for (int k = 1; k < 4; k++) {
        if (*c[k] < low) {
            low = *c[k];
        }
    }
    return low;
}

/* Lift the counters below `count` to it: a conservative update. */
static void
lift(unsigned char *c[4], unsigned char count)
{
    for (int k = 0; k < 4; k++) {
        if (*c[k] < count) {
            *c[k] = count;
        }
    }
}

/* Check a call's arguments (rows, mask, h, and `expected` in all) and find the counters. */
static int
parse(const char *name, PyObject *const *args, Py_ssize_t nargs, Py_ssize_t expected,
      unsigned char *c[4])
{
    if (nargs != expected) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd arguments (%zd given)", name, expected,
                     nargs);
        return -1;
    }
    return counters(args[0], args[1], args[2], c);
}

PyDoc_STRVAR(add_doc,
             "add(rows, mask, h) -> int\n\n"
             "Record one sighting of hash h (a conservative increment, saturating at 15); "
             "returns the new estimate.");

static PyObject *
add(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char *c[4];
    if (parse("add", args, nargs, 3, c) < 0) {
        return NULL;
    }
    unsigned char low = minimum(c);
    if (low == MAX_COUNT) {
        return PyLong_FromLong(low);
    }
    low += 1;
    lift(c, low);
    return PyLong_FromLong(low);
}

PyDoc_STRVAR(estimate_doc, "estimate(rows, mask, h) -> int\n\nThe row minimum for hash h.");

static PyObject *
estimate(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char *c[4];
    if (parse("estimate", args, nargs, 3, c) < 0) {
        return NULL;
    }
    return PyLong_FromLong(minimum(c));
}

PyDoc_STRVAR(raise_to_doc,
             "raise_to(rows, mask, h, count) -> None\n\n"
             "Lift the counters of hash h that are below count (0..255) to count.");

static PyObject *
raise_to(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    unsigned char *c[4];
    if (parse("raise_to", args, nargs, 4, c) < 0) {
        return NULL;
    }
    long count = PyLong_AsLong(args[3]);
    if (count == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (count < 0 || count > 255) {
        PyErr_SetString(PyExc_ValueError, "count must be in 0..255");
        return NULL;
    }
    lift(c, (unsigned char)count);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"add", (PyCFunction)(void (*)(void))add, METH_FASTCALL, add_doc},
    {"estimate", (PyCFunction)(void (*)(void))estimate, METH_FASTCALL, estimate_doc},
    {"raise_to", (PyCFunction)(void (*)(void))raise_to, METH_FASTCALL, raise_to_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "cluster.local.policies._sketch_core",
    "The frequency sketch's counter steps, compiled (see sketch.py).",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit__sketch_core(void)
{
    return PyModule_Create(&module_def);
}
