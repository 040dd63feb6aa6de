/* nodeagent/_accel_wg.c: the WireGuard part of the optional accelerator nodeagent._accel.
 *
 * Owns the Session type (one transport session: ChaCha20-Poly1305 through OpenSSL EVP, one
 * context per direction keyed once; the session's replay window, the ring-of-blocks of
 * nodeagent/engine/wireguard/replay.py state for state) and open_run, the receive run that
 * opens the transport data of known sessions in a GRO buffer in one call (the per-datagram
 * rules of WireGuardCore.receive_into). Nothing here raises on malformed packet bytes.
 */
#include "_accel.h"

#include <openssl/evp.h>

static const uint8_t ZERO16[16];

/* --- ChaCha20-Poly1305 sessions ------------------------------------------------------------- */

#define RING_WORDS 64
#define WINDOW ((RING_WORDS - 1) * 64)

typedef struct {
    PyObject_HEAD
    EVP_CIPHER_CTX *enc;
    EVP_CIPHER_CTX *dec;
    double created;       /* monotonic time the session was made (expiry, as core.py) */
    int confirm;          /* a responder's session not yet confirmed: open_run stops after it */
    uint64_t limit;       /* counters >= limit are never valid (REJECT_AFTER_MESSAGES) */
    uint64_t last;        /* replay window: the ring-of-blocks of replay.py, state for state */
    uint64_t ring[RING_WORDS];
} Session;

/* ReplayWindow.update of replay.py, step for step. */
static int replay_update(Session *s, uint64_t ctr)
{
    uint64_t last = s->last;
    if (ctr == last + 1 && ctr < s->limit) {
        s->last = ctr;
        unsigned bit = ctr & 63;
        if (bit)
            s->ring[(ctr >> 6) & (RING_WORDS - 1)] |= (uint64_t)1 << bit;
        else
            s->ring[(ctr >> 6) & (RING_WORDS - 1)] = 1;
        return 1;
    }
    if (ctr >= s->limit)
        return 0;
    uint64_t block = ctr >> 6;
    if (ctr > last) {
        uint64_t cur = last >> 6, diff = block - cur;
        if (diff) {
            if (diff >= RING_WORDS)
                memset(s->ring, 0, sizeof s->ring);
            else
                for (uint64_t i = cur + 1; i <= block; i++)
                    s->ring[i & (RING_WORDS - 1)] = 0;
        }
        s->last = ctr;
    } else if (last - ctr > WINDOW) {
        return 0;
    }
    uint64_t *w = &s->ring[block & (RING_WORDS - 1)], bit = (uint64_t)1 << (ctr & 63);
    if (*w & bit)
        return 0;
    *w |= bit;
    return 1;
}

static void session_dealloc(Session *s)
{
    if (s->enc)
        EVP_CIPHER_CTX_free(s->enc);
    if (s->dec)
        EVP_CIPHER_CTX_free(s->dec);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

static int session_init(Session *s, PyObject *args, PyObject *kw)
{
    Py_buffer send_key, recv_key;
    double created = 0.0;
    unsigned long long limit = UINT64_MAX;
    if (!PyArg_ParseTuple(args, "y*y*|dK", &send_key, &recv_key, &created, &limit))
        return -1;
    s->created = created;
    s->limit = limit;
    s->last = 0;
    s->confirm = 0;
    memset(s->ring, 0, sizeof s->ring);
    int ok = send_key.len == 32 && recv_key.len == 32;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "session keys are 32 bytes");
    } else {
        if (s->enc == NULL)
            s->enc = EVP_CIPHER_CTX_new();
        if (s->dec == NULL)
            s->dec = EVP_CIPHER_CTX_new();
        const EVP_CIPHER *c = EVP_chacha20_poly1305();
        ok = s->enc && s->dec
             && EVP_EncryptInit_ex(s->enc, c, NULL, NULL, NULL)
             && EVP_CIPHER_CTX_ctrl(s->enc, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL)
             && EVP_EncryptInit_ex(s->enc, NULL, NULL, send_key.buf, NULL)
             && EVP_DecryptInit_ex(s->dec, c, NULL, NULL, NULL)
             && EVP_CIPHER_CTX_ctrl(s->dec, EVP_CTRL_AEAD_SET_IVLEN, 12, NULL)
             && EVP_DecryptInit_ex(s->dec, NULL, NULL, recv_key.buf, NULL);
        if (!ok)
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 setup failed");
    }
    PyBuffer_Release(&send_key);
    PyBuffer_Release(&recv_key);
    return ok ? 0 : -1;
}

static void nonce_of(uint8_t nonce[12], uint64_t ctr)
{
    memset(nonce, 0, 4);
    for (int i = 0; i < 8; i++)
        nonce[4 + i] = (uint8_t)(ctr >> (8 * i));
}

/* seal_many(remote_index, counter, packets, mtu) -> list[bytes] | None
 * Each packet padded to a multiple of 16 (not past mtu), prefixed with the transport header,
 * counters from `counter` on. None (nothing sealed) if a packet is longer than mtu: the caller
 * then takes the pure-Python path, which knows that rare case. */
static PyObject *session_seal_many(Session *s, PyObject *args)
{
    unsigned int ridx;
    unsigned long long ctr;
    PyObject *pkts;
    int mtu;
    if (!PyArg_ParseTuple(args, "IKO!i", &ridx, &ctr, &PyList_Type, &pkts, &mtu))
        return NULL;
    Py_ssize_t count = PyList_GET_SIZE(pkts);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *p = PyList_GET_ITEM(pkts, i);
        if (!PyBytes_Check(p) || (mtu > 0 && PyBytes_GET_SIZE(p) > mtu))
            Py_RETURN_NONE;
    }
    PyObject *out = PyList_New(count);
    if (out == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < count; i++, ctr++) {
        PyObject *p = PyList_GET_ITEM(pkts, i);
        Py_ssize_t n = PyBytes_GET_SIZE(p);
        Py_ssize_t size = n + ((-n) & 15);
        if (mtu > 0 && size > mtu)
            size = mtu;
        PyObject *b = PyBytes_FromStringAndSize(NULL, 16 + size + TAG);
        if (b == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
        o[0] = MSG_TRANSPORT; o[1] = o[2] = o[3] = 0;
        for (int k = 0; k < 4; k++)
            o[4 + k] = (uint8_t)(ridx >> (8 * k));
        for (int k = 0; k < 8; k++)
            o[8 + k] = (uint8_t)(ctr >> (8 * k));
        uint8_t nonce[12];
        nonce_of(nonce, ctr);
        int l1 = 0, l2 = 0, l3 = 0;
        int ok = EVP_EncryptInit_ex(s->enc, NULL, NULL, NULL, nonce)
                 && (n == 0 || EVP_EncryptUpdate(s->enc, o + 16, &l1,
                                                 (const uint8_t *)PyBytes_AS_STRING(p), (int)n))
                 && (size == n || EVP_EncryptUpdate(s->enc, o + 16 + l1, &l2, ZERO16,
                                                    (int)(size - n)))
                 && EVP_EncryptFinal_ex(s->enc, o + 16 + l1 + l2, &l3)
                 && EVP_CIPHER_CTX_ctrl(s->enc, EVP_CTRL_AEAD_GET_TAG, TAG, o + 16 + size);
        if (!ok || l1 + l2 + l3 != size) {
            Py_DECREF(b);
            Py_DECREF(out);
            PyErr_SetString(PyExc_RuntimeError, "OpenSSL ChaCha20-Poly1305 encrypt failed");
            return NULL;
        }
        PyList_SET_ITEM(out, i, b);
    }
    return out;
}

/* The plaintext of one transport message (new reference); NULL without an exception set when
 * it does not authenticate, NULL with one set on a memory error. */
static PyObject *open_bytes(Session *s, const uint8_t *in, Py_ssize_t len)
{
    Py_ssize_t clen = len - 16 - TAG;
    if (clen < 0 || clen > INT32_MAX)
        return NULL;
    uint64_t ctr = 0;
    for (int k = 7; k >= 0; k--)
        ctr = (ctr << 8) | in[8 + k];
    uint8_t nonce[12];
    nonce_of(nonce, ctr);
    PyObject *b = PyBytes_FromStringAndSize(NULL, clen);
    if (b == NULL)
        return NULL;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
    int l1 = 0, l2 = 0;
    int ok = EVP_DecryptInit_ex(s->dec, NULL, NULL, NULL, nonce)
             && (clen == 0 || EVP_DecryptUpdate(s->dec, o, &l1, in + 16, (int)clen))
             && EVP_CIPHER_CTX_ctrl(s->dec, EVP_CTRL_AEAD_SET_TAG, TAG,
                                    (void *)(in + 16 + clen))
             && EVP_DecryptFinal_ex(s->dec, o + l1, &l2) > 0;
    if (!ok) {
        Py_DECREF(b);
        return NULL;
    }
    return b;
}

/* open(datagram) -> bytes | None: the plaintext of a transport message (header already
 * checked by the caller, counter read from it), None when it does not authenticate. */
static PyObject *session_open(Session *s, PyObject *arg)
{
    Py_buffer d;
    if (PyObject_GetBuffer(arg, &d, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *b = open_bytes(s, d.buf, d.len);
    PyBuffer_Release(&d);
    if (b == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return b;
}

static PyObject *session_update(Session *s, PyObject *arg)
{
    unsigned long long ctr = PyLong_AsUnsignedLongLong(arg);
    if (ctr == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_FALSE;  /* negative or past 64 bits: never a counter */
    }
    return PyBool_FromLong(replay_update(s, ctr));
}

static PyObject *session_check(Session *s, PyObject *arg)
{
    unsigned long long ctr = PyLong_AsUnsignedLongLong(arg);
    if (ctr == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    if (ctr >= s->limit)
        Py_RETURN_FALSE;
    if (ctr > s->last)
        Py_RETURN_TRUE;
    if (s->last - ctr > WINDOW)
        Py_RETURN_FALSE;
    return PyBool_FromLong(!((s->ring[(ctr >> 6) & (RING_WORDS - 1)] >> (ctr & 63)) & 1));
}

static PyObject *session_replay_state(Session *s, PyObject *unused)
{
    PyObject *ring = PyList_New(RING_WORDS);
    if (ring == NULL)
        return NULL;
    for (int i = 0; i < RING_WORDS; i++) {
        PyObject *w = PyLong_FromUnsignedLongLong(s->ring[i]);
        if (w == NULL) {
            Py_DECREF(ring);
            return NULL;
        }
        PyList_SET_ITEM(ring, i, w);
    }
    return Py_BuildValue("(KN)", (unsigned long long)s->last, ring);
}

static PyObject *session_get_confirm(Session *s, void *c) { return PyBool_FromLong(s->confirm); }
static int session_set_confirm(Session *s, PyObject *v, void *c)
{
    int t = v == NULL ? 0 : PyObject_IsTrue(v);
    if (t < 0)
        return -1;
    s->confirm = t;
    return 0;
}

static PyGetSetDef session_getset[] = {
    {"confirm", (getter)session_get_confirm, (setter)session_set_confirm,
     "True while a responder's session awaits its first packet (open_run stops after one)",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef session_methods[] = {
    {"update", (PyCFunction)session_update, METH_O,
     "update(counter) -> bool: ReplayWindow.update on this session's window"},
    {"check", (PyCFunction)session_check, METH_O,
     "check(counter) -> bool: ReplayWindow.check on this session's window"},
    {"replay_state", (PyCFunction)session_replay_state, METH_NOARGS,
     "replay_state() -> (last, ring words): the window, for tests"},
    {"seal_many", (PyCFunction)session_seal_many, METH_VARARGS,
     "seal_many(remote_index, counter, packets, mtu) -> list of transport messages, or None"},
    {"open", (PyCFunction)session_open, METH_O,
     "open(datagram) -> plaintext, or None when it does not authenticate"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "nodeagent._accel.Session",
    .tp_basicsize = sizeof(Session),
    .tp_dealloc = (destructor)session_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Session(send_key, recv_key): one WireGuard session's two AEAD directions",
    .tp_methods = session_methods,
    .tp_getset = session_getset,
    .tp_init = (initproc)session_init,
    .tp_new = PyType_GenericNew,
};

/* --- the receive run: transport data of known sessions, opened in one call -------------------

 * open_run(buf, offset, seg, keypairs, now, reject_after)
 *     -> (stop, [(keypair, plaintexts, rx_bytes, nonempty), ...], drops | None)
 * The datagrams of buf (each seg bytes, the last possibly shorter; seg <= 0: one datagram) from
 * offset on, as WireGuardCore.receive_into treats transport data: receiver index looked up in
 * keypairs (dict int -> Keypair, whose .fast is a Session), expiry, AEAD, replay window (after
 * the AEAD), inner IP length (padding stripped). It stops at the first datagram it leaves to
 * Python (not transport data, short, unknown receiver, a keypair without a Session) and right
 * after a packet accepted on a session whose `confirm` is set; stop is that datagram's offset
 * (len(buf) when all were taken). Groups list the keypairs that accepted packets, in order of
 * first appearance, for the caller's per-burst bookkeeping; drops counts (expired,
 * decrypt_failed, replay, bad_inner), None when all are 0. */
#define MAX_GROUPS 8

static PyObject *fast_name;

PyObject *accel_open_run(PyObject *self, PyObject *args)
{
    Py_buffer b;
    Py_ssize_t off, seg;
    PyObject *kps;
    double now, reject;
    if (!PyArg_ParseTuple(args, "y*nnO!dd", &b, &off, &seg, &PyDict_Type, &kps, &now, &reject))
        return NULL;
    const uint8_t *buf = b.buf;
    Py_ssize_t total = b.len;
    if (seg <= 0)
        seg = total > 0 ? total : 1;
    if (off < 0)
        off = total;
    PyObject *kp_of[MAX_GROUPS], *pts_of[MAX_GROUPS];
    Session *s_of[MAX_GROUPS];
    Py_ssize_t bytes_of[MAX_GROUPS];
    int nonempty_of[MAX_GROUPS];
    int ng = 0, g = -1, have_last = 0;
    uint32_t last_idx = 0;
    long expired = 0, bad = 0, replayed = 0, inner = 0;
    PyObject *result = NULL;
    while (off < total) {
        Py_ssize_t n = total - off < seg ? total - off : seg;
        const uint8_t *d = buf + off;
        if (n < 32 || d[0] != MSG_TRANSPORT || d[1] || d[2] || d[3])
            break;
        uint32_t idx = (uint32_t)d[4] | ((uint32_t)d[5] << 8) | ((uint32_t)d[6] << 16)
                       | ((uint32_t)d[7] << 24);
        if (!have_last || idx != last_idx) {
            PyObject *key = PyLong_FromUnsignedLong(idx);
            if (key == NULL)
                goto done;
            PyObject *kp = PyDict_GetItemWithError(kps, key);  /* borrowed */
            Py_DECREF(key);
            if (kp == NULL) {
                if (PyErr_Occurred())
                    goto done;
                break;
            }
            for (g = 0; g < ng; g++)
                if (kp_of[g] == kp)
                    break;
            if (g == ng) {
                if (ng == MAX_GROUPS)
                    break;
                PyObject *fast = PyObject_GetAttr(kp, fast_name);
                if (fast == NULL)
                    goto done;
                if (!Py_IS_TYPE(fast, &SessionType)) {
                    Py_DECREF(fast);
                    break;
                }
                PyObject *pts = PyList_New(0);
                if (pts == NULL) {
                    Py_DECREF(fast);
                    goto done;
                }
                Py_INCREF(kp);
                kp_of[ng] = kp;
                s_of[ng] = (Session *)fast;
                pts_of[ng] = pts;
                bytes_of[ng] = 0;
                nonempty_of[ng] = 0;
                ng++;
            }
            last_idx = idx;
            have_last = 1;
        }
        Session *s = s_of[g];
        off += n;
        if (now - s->created >= reject) {
            expired++;
            continue;
        }
        PyObject *pt = open_bytes(s, d, n);
        if (pt == NULL) {
            if (PyErr_Occurred())
                goto done;
            bad++;
            continue;
        }
        uint64_t ctr = 0;
        for (int k = 7; k >= 0; k--)
            ctr = (ctr << 8) | d[8 + k];
        if (!replay_update(s, ctr)) {
            Py_DECREF(pt);
            replayed++;
            continue;
        }
        bytes_of[g] += n;
        Py_ssize_t m = PyBytes_GET_SIZE(pt);
        if (m > 0) {
            nonempty_of[g] = 1;
            const uint8_t *q = (const uint8_t *)PyBytes_AS_STRING(pt);
            int v = q[0] >> 4;
            Py_ssize_t want = -1;
            if (v == 4 && m >= 20)
                want = be16(q + 2);
            else if (v == 6 && m >= 40)
                want = 40 + be16(q + 4);
            if (want < 0 || want > m || want < 20) {
                inner++;
            } else {
                if (want != m && _PyBytes_Resize(&pt, want) < 0)
                    goto done;
                if (PyList_Append(pts_of[g], pt) < 0) {
                    Py_DECREF(pt);
                    goto done;
                }
            }
        }
        Py_DECREF(pt);
        if (s->confirm)
            break;
    }
    PyObject *groups = PyList_New(0);
    if (groups == NULL)
        goto done;
    for (int i = 0; i < ng; i++) {
        if (!bytes_of[i])
            continue;
        PyObject *t = Py_BuildValue("(OOnO)", kp_of[i], pts_of[i], bytes_of[i],
                                    nonempty_of[i] ? Py_True : Py_False);
        if (t == NULL || PyList_Append(groups, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(groups);
            goto done;
        }
        Py_DECREF(t);
    }
    if (expired || bad || replayed || inner)
        result = Py_BuildValue("(nN(llll))", off, groups, expired, bad, replayed, inner);
    else
        result = Py_BuildValue("(nNO)", off, groups, Py_None);
done:
    for (int i = 0; i < ng; i++) {
        Py_DECREF(kp_of[i]);
        Py_DECREF((PyObject *)s_of[i]);
        Py_DECREF(pts_of[i]);
    }
    PyBuffer_Release(&b);
    return result;
}

int accel_wg_add(PyObject *m)
{
    if (PyType_Ready(&SessionType) < 0)
        return -1;
    fast_name = PyUnicode_InternFromString("fast");
    if (fast_name == NULL)
        return -1;
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0) {
        Py_DECREF(&SessionType);
        return -1;
    }
    return 0;
}
