/*
 * `WTinyLFUPolicy.place` (cluster/local/policies/tinylfu.py), compiled; and `hit_keys`, the loop of
 * `hit_many` (the result cache hands over its buffered accesses in batches).
 *
 * `place` runs on every miss of a W-TinyLFU cache, and three times more for each sampled miss of
 * the adaptive policy's miniatures: in CPython it is about half of a result cache's evicting put
 * (~240 of ~440 bytecodes). This is the same function, step for step: the Python method stays
 * the definition (and the fallback where no C compiler was at hand), and a unit test runs both
 * on twin policies and compares every decision. Only the common steps run here (the fast
 * rejection with its wear written out, as in the method); the rare ones (folding hits into a
 * node, a contest that needs `_contest`, the main space giving way) call the policy's own Python
 * methods, exactly where the Python method calls them.
 *
 * The policy's fields are `__slots__`: `bind(cls)` finds the offset of each slot this function
 * uses (their member descriptors, T_OBJECT_EX), and `place` reads and writes them there, as
 * CPython's own slot access does, instead of looking each name up (a generic attribute lookup
 * from C costs more than the specialised bytecode it replaces). `place` refuses an object that
 * is not an instance of the bound class.
 *
 * A node is a list of 8 items (see tinylfu.py: REFS, CHARGE, FREQ, HASH, BASE, SEGMENT, KEY,
 * SAMPLED); a node of another shape raises TypeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

enum { REFS, CHARGE, FREQ, HASH, BASE, SEGMENT, KEY, SAMPLED, NODE_SIZE };
enum { WINDOW, PROBATION, PROTECTED, DEAD };
#define HASHDOS_THRESHOLD 6

enum {
    S_INDEX,
    S_WINDOW,
    S_PROBATION,
    S_USED,
    S_WINDOW_USED,
    S_WINDOW_MAX,
    S_CAPACITY,
    S_ADMIT_MARGIN,
    S_MARGIN_FROM,
    S_WEAR,
    S_DEAD,
    S_DEPARTURES,
    S_OWNS_SKETCH,
    S_SKETCH,
    S_REJECTIONS,
    N_SLOTS
};
static const char *const slot_names[N_SLOTS] = {
    "_index", "_window",      "_probation", "_used",       "_window_used",
    "_window_max", "capacity", "admit_margin", "margin_from", "wear",
    "_dead", "departures",    "_owns_sketch", "sketch",      "_rejections",
};
static Py_ssize_t offsets[N_SLOTS];
static PyTypeObject *bound_type;

/* Interned names of the methods `place` calls. */
static PyObject *s_append, *s_popleft, *s_fold, *s_contest, *s_victim, *s_evict, *s_raise_to;

#define SLOT(self, i) (*(PyObject **)((char *)(self) + offsets[i]))

/* The object in slot `i` (borrowed), or NULL with AttributeError when it was never set. */
static PyObject *
get_slot(PyObject *self, int i)
{
    PyObject *value = SLOT(self, i);
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "policy has no attribute %s", slot_names[i]);
    }
    return value;
}

static int
get_int(PyObject *self, int i, Py_ssize_t *out)
{
    PyObject *value = get_slot(self, i);
    if (value == NULL) {
        return -1;
    }
    *out = PyLong_AsSsize_t(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

static int
set_int(PyObject *self, int i, Py_ssize_t value)
{
    PyObject *number = PyLong_FromSsize_t(value);
    if (number == NULL) {
        return -1;
    }
    Py_XSETREF(SLOT(self, i), number);
    return 0;
}

static int
check_node(PyObject *node)
{
    if (!PyList_CheckExact(node) || PyList_GET_SIZE(node) != NODE_SIZE) {
        PyErr_SetString(PyExc_TypeError, "a queue holds something other than a node");
        return -1;
    }
    return 0;
}

static int
node_int(PyObject *node, int i, Py_ssize_t *out)
{
    *out = PyLong_AsSsize_t(PyList_GET_ITEM(node, i));
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}

/* `node[i] = value`. */
static int
set_node_int(PyObject *node, int i, Py_ssize_t value)
{
    PyObject *number = PyLong_FromSsize_t(value);
    if (number == NULL) {
        return -1;
    }
    PyObject *old = PyList_GET_ITEM(node, i);
    PyList_SET_ITEM(node, i, number);
    Py_DECREF(old);
    return 0;
}

/* Call `target.name(*args)` and drop the result; -1 with an exception set. */
static int
call_void(PyObject *target, PyObject *name, PyObject *arg1, PyObject *arg2)
{
    PyObject *args[3] = {target, arg1, arg2};
    size_t count = 1 + (arg1 != NULL) + (arg2 != NULL);
    PyObject *result =
        PyObject_VectorcallMethod(name, args, count | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

PyDoc_STRVAR(bind_doc,
             "bind(cls) -> None\n\n"
             "Find the slots `place` uses in cls (a W-TinyLFU policy class with __slots__); "
             "place then accepts instances of cls and of its subclasses.");

static PyObject *
bind(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "bind() takes a class");
        return NULL;
    }
    Py_ssize_t found[N_SLOTS];
    for (int i = 0; i < N_SLOTS; i++) {
        PyObject *descriptor = PyObject_GetAttrString(cls, slot_names[i]);
        if (descriptor == NULL) {
            return NULL;
        }
        int is_slot = Py_IS_TYPE(descriptor, &PyMemberDescr_Type) &&
                      ((PyMemberDescrObject *)descriptor)->d_member->type == T_OBJECT_EX;
        if (is_slot) {
            found[i] = ((PyMemberDescrObject *)descriptor)->d_member->offset;
        }
        Py_DECREF(descriptor);
        if (!is_slot) {
            PyErr_Format(PyExc_TypeError, "%s is not a slot of the class", slot_names[i]);
            return NULL;
        }
    }
    memcpy(offsets, found, sizeof(offsets));
    Py_INCREF(cls);
    Py_XSETREF(bound_type, (PyTypeObject *)cls);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(place_doc,
             "place(policy, key, charge, h, freq, sampled=False) -> list\n\n"
             "WTinyLFUPolicy.place(policy, key, charge, h, freq, sampled), compiled.");

static PyObject *
place(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5 && nargs != 6) {
        PyErr_Format(PyExc_TypeError, "place() takes 5 or 6 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *self = args[0], *key = args[1], *charge_obj = args[2], *h = args[3],
             *freq = args[4], *sampled = nargs == 6 ? args[5] : Py_False;
    if (bound_type == NULL || !PyObject_TypeCheck(self, bound_type)) {
        PyErr_SetString(PyExc_TypeError, "place() needs an instance of the bound policy class");
        return NULL;
    }
    Py_ssize_t charge = PyLong_AsSsize_t(charge_obj);
    if (charge == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *index = get_slot(self, S_INDEX), *window = get_slot(self, S_WINDOW),
             *probation = get_slot(self, S_PROBATION);
    if (index == NULL || window == NULL || probation == NULL) {
        return NULL;
    }
    if (!PyDict_CheckExact(index)) {
        PyErr_SetString(PyExc_TypeError, "the policy's index is not a dict");
        return NULL;
    }
    Py_ssize_t used, window_used, window_max, capacity, admit_margin, margin_from;
    if (get_int(self, S_USED, &used) < 0 || get_int(self, S_WINDOW_USED, &window_used) < 0 ||
        get_int(self, S_WINDOW_MAX, &window_max) < 0 || get_int(self, S_CAPACITY, &capacity) < 0 ||
        get_int(self, S_ADMIT_MARGIN, &admit_margin) < 0 ||
        get_int(self, S_MARGIN_FROM, &margin_from) < 0) {
        return NULL;
    }
    /* Held for the whole call, as the Python method's locals hold them. */
    Py_INCREF(index);
    Py_INCREF(window);
    Py_INCREF(probation);
    PyObject *evicted = NULL, *candidate = NULL, *victim = NULL;
    PyObject *node = PyList_New(NODE_SIZE);
    if (node == NULL) {
        goto error;
    }
    PyObject *items[NODE_SIZE] = {NULL, charge_obj, freq, h, freq, NULL, key, sampled};
    items[REFS] = PyLong_FromLong(0);
    items[SEGMENT] = PyLong_FromLong(WINDOW);
    if (items[REFS] == NULL || items[SEGMENT] == NULL) {
        Py_XDECREF(items[REFS]);
        Py_XDECREF(items[SEGMENT]);
        goto error;
    }
    for (int i = 0; i < NODE_SIZE; i++) {
        if (i != REFS && i != SEGMENT) {
            Py_INCREF(items[i]);
        }
        PyList_SET_ITEM(node, i, items[i]);
    }
    if (PyDict_SetItem(index, key, node) < 0 || call_void(window, s_append, node, NULL) < 0) {
        goto error;
    }
    used += charge;
    window_used += charge;
    evicted = PyList_New(0);
    if (evicted == NULL) {
        goto error;
    }
    PyObject *newcomer = node; /* compared by identity only; `node` keeps it alive */
    while (window_used > window_max) {
        PyObject *popleft_args[1] = {window};
        candidate = PyObject_VectorcallMethod(s_popleft, popleft_args,
                                              1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (candidate == NULL || check_node(candidate) < 0) {
            goto error;
        }
        Py_ssize_t segment, refs;
        if (node_int(candidate, SEGMENT, &segment) < 0) {
            goto error;
        }
        if (segment != WINDOW) {
            Py_ssize_t dead;
            if (get_int(self, S_DEAD, &dead) < 0 || set_int(self, S_DEAD, dead - 1) < 0) {
                goto error;
            }
            Py_CLEAR(candidate);
            continue;
        }
        if (node_int(candidate, REFS, &refs) < 0) {
            goto error;
        }
        if (refs) {
            PyObject *refs_obj = PyList_GET_ITEM(candidate, REFS);
            Py_INCREF(refs_obj);
            int failed = call_void(self, s_fold, candidate, refs_obj);
            Py_DECREF(refs_obj);
            if (failed || call_void(window, s_append, candidate, NULL) < 0) {
                goto error;
            }
            Py_CLEAR(candidate);
            continue;
        }
        if (candidate == newcomer) {
            Py_ssize_t waiting = PyObject_Size(window);
            if (waiting < 0) {
                goto error;
            }
            if (waiting > 0) {
                /* As in an LRU window, the newcomer is the last to go. */
                if (call_void(window, s_append, candidate, NULL) < 0) {
                    goto error;
                }
                newcomer = NULL;
                Py_CLEAR(candidate);
                continue;
            }
        }
        Py_ssize_t cost;
        if (node_int(candidate, CHARGE, &cost) < 0) {
            goto error;
        }
        window_used -= cost;
        if (used > capacity) {
            Py_ssize_t waiting = PyObject_Size(probation);
            if (waiting < 0) {
                goto error;
            }
            if (waiting > 0) {
                victim = PySequence_GetItem(probation, 0);
                if (victim == NULL || check_node(victim) < 0) {
                    goto error;
                }
            }
            Py_ssize_t candidate_freq;
            if (node_int(candidate, FREQ, &candidate_freq) < 0) {
                goto error;
            }
            int rejected = 0;
            if (victim != NULL && candidate_freq < HASHDOS_THRESHOLD) {
                Py_ssize_t victim_freq, victim_segment, victim_refs;
                if (node_int(victim, FREQ, &victim_freq) < 0 ||
                    node_int(victim, SEGMENT, &victim_segment) < 0 ||
                    node_int(victim, REFS, &victim_refs) < 0) {
                    goto error;
                }
                Py_ssize_t margin = candidate_freq >= margin_from ? admit_margin : 0;
                rejected = candidate_freq <= victim_freq + margin &&
                           victim_segment == PROBATION && !victim_refs;
            }
            if (rejected) {
                used -= cost;
                Py_ssize_t wear, departures, base;
                if (get_int(self, S_WEAR, &wear) < 0) {
                    goto error;
                }
                if (wear) {
                    /* `_wear_down(victim)`, written out: it runs on most rejections. */
                    Py_ssize_t rejections, victim_freq;
                    if (get_int(self, S_REJECTIONS, &rejections) < 0) {
                        goto error;
                    }
                    rejections += 1;
                    if (rejections >= wear) {
                        rejections = 0;
                        if (node_int(victim, FREQ, &victim_freq) < 0) {
                            goto error;
                        }
                        if (victim_freq > 1 && set_node_int(victim, FREQ, victim_freq - 1) < 0) {
                            goto error;
                        }
                    }
                    if (set_int(self, S_REJECTIONS, rejections) < 0) {
                        goto error;
                    }
                }
                Py_CLEAR(victim);
                /* `_forget(candidate)`, as the Python method writes it out. */
                PyObject *loser = PyList_GET_ITEM(candidate, KEY);
                if (PyDict_DelItem(index, loser) < 0 || set_node_int(candidate, SEGMENT, DEAD) < 0 ||
                    get_int(self, S_DEPARTURES, &departures) < 0 ||
                    set_int(self, S_DEPARTURES, departures + 1) < 0 ||
                    node_int(candidate, BASE, &base) < 0) {
                    goto error;
                }
                if (candidate_freq > base) {
                    PyObject *owns = get_slot(self, S_OWNS_SKETCH);
                    int owns_sketch = owns == NULL ? -1 : PyObject_IsTrue(owns);
                    if (owns_sketch < 0) {
                        goto error;
                    }
                    if (owns_sketch) {
                        PyObject *sketch = get_slot(self, S_SKETCH);
                        if (sketch == NULL) {
                            goto error;
                        }
                        Py_INCREF(sketch);
                        int failed = call_void(sketch, s_raise_to, PyList_GET_ITEM(candidate, HASH),
                                               PyList_GET_ITEM(candidate, FREQ));
                        Py_DECREF(sketch);
                        if (failed < 0) {
                            goto error;
                        }
                    }
                }
                if (PyList_Append(evicted, PyList_GET_ITEM(candidate, KEY)) < 0) {
                    goto error;
                }
                Py_CLEAR(candidate);
                continue;
            }
            Py_CLEAR(victim);
            if (set_int(self, S_USED, used - cost) < 0) {
                goto error;
            }
            PyObject *contest_args[3] = {self, candidate, evicted};
            PyObject *verdict = PyObject_VectorcallMethod(
                s_contest, contest_args, 3 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
            if (verdict == NULL) {
                goto error;
            }
            int admitted = PyObject_IsTrue(verdict);
            Py_DECREF(verdict);
            if (admitted < 0 || get_int(self, S_USED, &used) < 0) {
                goto error;
            }
            if (!admitted) {
                Py_CLEAR(candidate);
                continue;
            }
            used += cost;
        }
        if (set_node_int(candidate, SEGMENT, PROBATION) < 0 ||
            call_void(probation, s_append, candidate, NULL) < 0) {
            goto error;
        }
        Py_CLEAR(candidate);
    }
    if (set_int(self, S_WINDOW_USED, window_used) < 0 || set_int(self, S_USED, used) < 0) {
        goto error;
    }
    /* The window holds the newcomer whatever its size; the main space gives way. */
    for (;;) {
        if (get_int(self, S_USED, &used) < 0) {
            goto error;
        }
        if (used <= capacity) {
            break;
        }
        PyObject *victim_args[1] = {self};
        victim = PyObject_VectorcallMethod(s_victim, victim_args,
                                           1 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        if (victim == NULL) {
            goto error;
        }
        if (victim == Py_None) {
            Py_CLEAR(victim);
            break;
        }
        PyObject *evict_args[2] = {self, victim};
        PyObject *gone = PyObject_VectorcallMethod(s_evict, evict_args,
                                                   2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
        Py_CLEAR(victim);
        if (gone == NULL) {
            goto error;
        }
        int failed = PyList_Append(evicted, gone);
        Py_DECREF(gone);
        if (failed < 0) {
            goto error;
        }
    }
    Py_DECREF(node);
    Py_DECREF(index);
    Py_DECREF(window);
    Py_DECREF(probation);
    return evicted;

error:
    Py_XDECREF(candidate);
    Py_XDECREF(victim);
    Py_XDECREF(evicted);
    Py_XDECREF(node);
    Py_DECREF(index);
    Py_DECREF(window);
    Py_DECREF(probation);
    return NULL;
}

PyDoc_STRVAR(hit_keys_doc,
             "hit_keys(index, keys, on_sampled) -> None\n\n"
             "Count a hit in the node of each key of keys found in index (a dict of nodes); "
             "for a node marked sampled, call on_sampled(key, charge, h, True) unless it is "
             "None. The same steps as tinylfu._hit_keys_python.");

static PyObject *
hit_keys(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "hit_keys() takes 3 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *index = args[0], *on_sampled = args[2];
    if (!PyDict_CheckExact(index)) {
        PyErr_SetString(PyExc_TypeError, "index must be a dict");
        return NULL;
    }
    PyObject *keys = PyObject_GetIter(args[1]);
    if (keys == NULL) {
        return NULL;
    }
    Py_INCREF(index);
    PyObject *key;
    while ((key = PyIter_Next(keys)) != NULL) {
        PyObject *node = PyDict_GetItemWithError(index, key);
        if (node == NULL) {
            Py_DECREF(key);
            if (PyErr_Occurred()) {
                goto error;
            }
            continue;
        }
        Py_INCREF(node);
        Py_ssize_t refs;
        if (check_node(node) < 0 || node_int(node, REFS, &refs) < 0 ||
            set_node_int(node, REFS, refs + 1) < 0) {
            Py_DECREF(node);
            Py_DECREF(key);
            goto error;
        }
        if (on_sampled != Py_None) {
            int sampled = PyObject_IsTrue(PyList_GET_ITEM(node, SAMPLED));
            PyObject *result = NULL;
            if (sampled > 0) {
                PyObject *call[4] = {key, PyList_GET_ITEM(node, CHARGE),
                                     PyList_GET_ITEM(node, HASH), Py_True};
                result = PyObject_Vectorcall(on_sampled, call, 4, NULL);
            }
            if (sampled < 0 || (sampled > 0 && result == NULL)) {
                Py_DECREF(node);
                Py_DECREF(key);
                goto error;
            }
            Py_XDECREF(result);
        }
        Py_DECREF(node);
        Py_DECREF(key);
    }
    if (PyErr_Occurred()) {
        goto error;
    }
    Py_DECREF(keys);
    Py_DECREF(index);
    Py_RETURN_NONE;

error:
    Py_DECREF(keys);
    Py_DECREF(index);
    return NULL;
}

static PyMethodDef methods[] = {
    {"hit_keys", (PyCFunction)(void (*)(void))hit_keys, METH_FASTCALL, hit_keys_doc},
    {"bind", (PyCFunction)bind, METH_O, bind_doc},
    {"place", (PyCFunction)(void (*)(void))place, METH_FASTCALL, place_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    "cluster.local.policies._tinylfu_core",
    "W-TinyLFU's place and hit loop, compiled (see tinylfu.py).",
    0,
    methods,
};

PyMODINIT_FUNC
PyInit__tinylfu_core(void)
{
    struct {
        PyObject **name;
        const char *text;
    } names[] = {
        {&s_append, "append"}, {&s_popleft, "popleft"}, {&s_fold, "_fold"},
        {&s_contest, "_contest"}, {&s_victim, "_victim"}, {&s_evict, "_evict"},
        {&s_raise_to, "raise_to"},
    };
    for (size_t i = 0; i < sizeof(names) / sizeof(names[0]); i++) {
        *names[i].name = PyUnicode_InternFromString(names[i].text);
        if (*names[i].name == NULL) {
            return NULL;
        }
    }
    return PyModule_Create(&module_def);
}
