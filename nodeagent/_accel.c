/* nodeagent._accel: optional compiled per-packet loops of the data path.
 *
 * Owns: WireGuard transport sealing/opening of whole bursts with ChaCha20-Poly1305 (OpenSSL
 * EVP, one cipher context per session direction, keyed once), the Internet checksum, the
 * cutting of a vnet-header TUN read (TSO segment or partial checksum) into finished IP packets,
 * and a TUN read loop that drains the fd in one call. Every function mirrors a pure-Python one
 * (nodeagent/engine/wireguard/core.py _seal / receive_into, nodeagent/tundev/vnet.py
 * split_read, nodeagent/packet/checksum.py checksum, nodeagent/tundev/device.py _readable) and
 * tests run both against each other. The WireGuard sessions, their replay windows and the receive
 * run live in _accel_wg.c; _accel.h holds what the two share. nodeagent/accel.py decides at import whether this module is
 * used (NODEAGENT_NO_ACCEL=1: never). No function here raises on malformed packet bytes: a read
 * it cannot make sense of yields no packets, a datagram that does not authenticate yields None.
 */
#include "_accel.h"
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>


#define VNET_HDR_LEN 10
#define READ_SIZE (65535 + VNET_HDR_LEN)
#define F_NEEDS_CSUM 1
#define GSO_NONE 0
#define GSO_TCPV4 1
#define GSO_TCPV6 4
#define GSO_ECN 0x80
#define TCP_FIN 0x01
#define TCP_PSH 0x08
#define TCP_CWR 0x80

/* --- checksum ------------------------------------------------------------------------------- */

static uint64_t sum_be(const uint8_t *p, Py_ssize_t n, uint64_t sum)
{
    /* Big-endian 32-bit words summed in 64 bits fold to the 16-bit ones'-complement sum. */
    while (n >= 4) {
        sum += ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
        p += 4;
        n -= 4;
    }
    if (n >= 2) {
        sum += ((uint32_t)p[0] << 8) | p[1];
        p += 2;
        n -= 2;
    }
    if (n)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static uint16_t fold(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xFFFF) + (sum >> 16);
    return (uint16_t)(~sum & 0xFFFF);
}

static PyObject *py_checksum(PyObject *self, PyObject *args)
{
    Py_buffer b;
    PyObject *initial = NULL;
    if (!PyArg_ParseTuple(args, "y*|O", &b, &initial))
        return NULL;
    uint64_t s = 0;
    if (initial != NULL) {  /* any non-negative int (an IPv6 pseudo-header sum is 129 bits) */
        PyObject *mod = PyLong_FromLong(0xFFFF);
        PyObject *r = mod ? PyNumber_Remainder(initial, mod) : NULL;
        Py_XDECREF(mod);
        if (r == NULL) {
            PyBuffer_Release(&b);
            return NULL;
        }
        s = PyLong_AsUnsignedLongLong(r);
        Py_DECREF(r);
        if (PyErr_Occurred()) {
            PyBuffer_Release(&b);
            return NULL;
        }
        /* A nonzero multiple of 0xFFFF is ones'-complement -0 (0xFFFF), not +0: the sum of
         * an all-zero buffer then checksums to 0, as checksum.py says. */
        if (s == 0 && PyObject_IsTrue(initial) == 1)
            s = 0xFFFF;
    }
    s = sum_be(b.buf, b.len, s);
    PyBuffer_Release(&b);
    return PyLong_FromLong(fold(s));
}

/* --- vnet-header reads ---------------------------------------------------------------------- */

/* Append one finished TCP segment built from the super-segment's headers. */
static int tcp_segment(PyObject *out, const uint8_t *pkt, int ihl, int thl, const uint8_t *data,
                       Py_ssize_t dlen, int v4, uint64_t addr_sum, uint16_t ident, uint32_t seq,
                       uint8_t flags)
{
    Py_ssize_t tlen = thl + dlen;
    PyObject *b = PyBytes_FromStringAndSize(NULL, ihl + tlen);
    if (b == NULL)
        return -1;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
    memcpy(o, pkt, ihl + thl);
    memcpy(o + ihl + thl, data, dlen);
    uint8_t *t = o + ihl;
    put32(t + 4, seq);
    t[13] = flags;
    t[16] = t[17] = 0;
    put16(t + 16, fold(sum_be(t, tlen, addr_sum + 6 + (uint64_t)tlen)));
    if (v4) {
        put16(o + 2, (uint16_t)(ihl + tlen));
        put16(o + 4, ident);
        o[10] = o[11] = 0;
        put16(o + 10, fold(sum_be(o, ihl, 0)));
    } else {
        put16(o + 4, (uint16_t)tlen);
    }
    int r = PyList_Append(out, b);
    Py_DECREF(b);
    return r;
}

/* Cut a TSO super-segment (no vnet header) into MSS-sized packets; appends to out.
 * Returns 0 (possibly having appended nothing for an unusable packet) or -1 on a Python error. */
static int segment_tcp(PyObject *out, const uint8_t *pkt, Py_ssize_t plen, int kind, int mss)
{
    if (plen < 1)
        return 0;
    int version = pkt[0] >> 4, ihl;
    uint64_t addr_sum;
    uint16_t ident = 0;
    if (version == 4 && kind == GSO_TCPV4) {
        ihl = (pkt[0] & 0x0F) * 4;
        if (ihl < 20 || plen < ihl || pkt[9] != 6)
            return 0;
        addr_sum = sum_be(pkt + 12, 8, 0);
        ident = be16(pkt + 4);
    } else if (version == 6 && kind == GSO_TCPV6) {
        ihl = 40;
        if (plen < 40 || pkt[6] != 6)
            return 0;
        addr_sum = sum_be(pkt + 8, 32, 0);
    } else {
        return 0;
    }
    if (plen < ihl + 14)
        return 0;
    int thl = (pkt[ihl + 12] >> 4) * 4;
    Py_ssize_t hdr_end = ihl + thl;
    if (thl < 20 || hdr_end > plen || mss <= 0)
        return 0;
    uint32_t seq0 = be32(pkt + ihl + 4);
    uint8_t tflags = pkt[ihl + 13];
    const uint8_t *payload = pkt + hdr_end;
    Py_ssize_t n = plen - hdr_end;
    int v4 = version == 4;
    if (n == 0)
        return tcp_segment(out, pkt, ihl, thl, payload, 0, v4, addr_sum, ident, seq0, tflags);
    Py_ssize_t last = (n - 1) / mss * mss;
    for (Py_ssize_t off = 0; off < n; off += mss) {
        uint8_t f = tflags;
        if (off != last)
            f &= ~(TCP_FIN | TCP_PSH);
        if (off)
            f &= ~TCP_CWR;
        Py_ssize_t len = n - off < mss ? n - off : mss;
        if (tcp_segment(out, pkt, ihl, thl, payload + off, len, v4, addr_sum,
                        (uint16_t)(ident + off / mss), (uint32_t)(seq0 + off), f) < 0)
            return -1;
    }
    return 0;
}

/* One vnet-header read → packets appended to out (the rules of vnet.split_read). */
static int split_into(PyObject *out, const uint8_t *buf, Py_ssize_t n)
{
    if (n <= VNET_HDR_LEN)
        return 0;
    uint8_t flags = buf[0], gso_type = buf[1];
    uint16_t gso_size = (uint16_t)(buf[4] | (buf[5] << 8));
    uint16_t cs_start = (uint16_t)(buf[6] | (buf[7] << 8));
    uint16_t cs_off = (uint16_t)(buf[8] | (buf[9] << 8));
    const uint8_t *pkt = buf + VNET_HDR_LEN;
    Py_ssize_t plen = n - VNET_HDR_LEN;
    int kind = gso_type & ~GSO_ECN;
    if (kind == GSO_NONE) {
        PyObject *b;
        if (!(flags & F_NEEDS_CSUM)) {
            b = PyBytes_FromStringAndSize((const char *)pkt, plen);
        } else {
            Py_ssize_t at = (Py_ssize_t)cs_start + cs_off;
            if (at + 2 > plen || cs_start >= plen)
                return 0;
            b = PyBytes_FromStringAndSize((const char *)pkt, plen);
            if (b == NULL)
                return -1;
            uint8_t *o = (uint8_t *)PyBytes_AS_STRING(b);
            put16(o + at, fold(sum_be(pkt + cs_start, plen - cs_start, 0)));
        }
        if (b == NULL)
            return -1;
        int r = PyList_Append(out, b);
        Py_DECREF(b);
        return r;
    }
    if (kind == GSO_TCPV4 || kind == GSO_TCPV6)
        return segment_tcp(out, pkt, plen, kind, gso_size);
    return 0;
}

static PyObject *py_split_read(PyObject *self, PyObject *arg)
{
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *out = PyList_New(0);
    if (out != NULL && split_into(out, b.buf, b.len) < 0)
        Py_CLEAR(out);
    PyBuffer_Release(&b);
    return out;
}

/* tun_read(fd, max_reads, vnet, out) -> (reads, tso_reads, bad_reads, errno)
 * Reads until EAGAIN (errno 0 then) or max_reads, appending plain IP packets to the list out.
 * Another errno stops the loop and is returned (the caller counts and judges it). */
static PyObject *py_tun_read(PyObject *self, PyObject *args)
{
    int fd, max_reads, vnet;
    PyObject *out;
    if (!PyArg_ParseTuple(args, "iipO!", &fd, &max_reads, &vnet, &PyList_Type, &out))
        return NULL;
    static uint8_t buf[READ_SIZE];  /* the GIL is held throughout: one caller at a time */
    int reads = 0, tso = 0, bad = 0, err = 0;
    for (; reads < max_reads; reads++) {
        ssize_t n = read(fd, buf, sizeof buf);
        if (n < 0) {
            err = (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : errno;
            if (err == EINTR) {
                err = 0;
                continue;
            }
            break;
        }
        if (!vnet) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)buf, n);
            if (b == NULL || PyList_Append(out, b) < 0) {
                Py_XDECREF(b);
                return NULL;
            }
            Py_DECREF(b);
            continue;
        }
        Py_ssize_t before = PyList_GET_SIZE(out);
        if (n > VNET_HDR_LEN && buf[0] == 0 && buf[1] == 0) {
            PyObject *b = PyBytes_FromStringAndSize((const char *)buf + VNET_HDR_LEN,
                                                    n - VNET_HDR_LEN);
            if (b == NULL || PyList_Append(out, b) < 0) {
                Py_XDECREF(b);
                return NULL;
            }
            Py_DECREF(b);
            continue;
        }
        if (split_into(out, buf, n) < 0)
            return NULL;
        Py_ssize_t got = PyList_GET_SIZE(out) - before;
        if (got > 1)
            tso++;
        else if (got == 0)
            bad++;
    }
    return Py_BuildValue("(iiii)", reads, tso, bad, err);
}

/* --- coalescing decrypted TCP segments into GSO writes (vnet.coalesce) --------------------- */

#define TCP_ACK 0x10
#define MAX_RUN_SEGMENTS 64
#define MAX_IP_TOTAL 65535

typedef struct {
    const uint8_t *first;
    Py_ssize_t first_len;
    Py_ssize_t slot;
    int ihl, thl, mss, nparts, open, psh;
    Py_ssize_t size;
    uint32_t next_seq;
    Py_ssize_t head, tail;  /* joined packets, a list through next_part */
    const uint8_t *key;
    int key_len;
} Run;

/* The flow key's offset and length for a segment that may join a run, or 0 (written alone). */
static int flow_key(const uint8_t *p, Py_ssize_t n, int *off)
{
    if (n < 40)
        return 0;
    if (p[0] == 0x45) {
        if (p[9] != 6 || (be16(p + 6) & 0x3FFF) || be16(p + 2) != n)
            return 0;
        *off = 12;
        return 12;
    }
    if (p[0] >> 4 == 6) {
        if (n < 60 || p[6] != 6 || be16(p + 4) + 40 != n)
            return 0;
        *off = 8;
        return 36;
    }
    return 0;
}

static void run_start(Run *r, const uint8_t *p, Py_ssize_t n, Py_ssize_t slot)
{
    r->first = p;
    r->first_len = n;
    r->slot = slot;
    r->ihl = p[0] == 0x45 ? 20 : 40;
    r->thl = (p[r->ihl + 12] >> 4) * 4;
    r->mss = (int)(n - r->ihl - r->thl);
    r->nparts = 0;
    r->size = n;
    r->psh = 0;
    r->head = r->tail = -1;
    r->open = r->thl >= 20 && r->mss > 0 && p[r->ihl + 13] == TCP_ACK;
    r->next_seq = r->open ? be32(p + r->ihl + 4) + (uint32_t)r->mss : 0;
}

static int run_take(Run *r, const uint8_t *p, Py_ssize_t n)
{
    if (!r->open)
        return 0;
    const uint8_t *f = r->first;
    int ihl = r->ihl, thl = r->thl, hdr_end = ihl + thl;
    Py_ssize_t dlen = n - hdr_end;
    if (dlen <= 0 || dlen > r->mss || r->nparts + 1 >= MAX_RUN_SEGMENTS
        || r->size + dlen > MAX_IP_TOTAL)
        goto close;
    uint8_t flags = p[ihl + 13];
    if ((flags & ~TCP_PSH) != TCP_ACK || (p[ihl + 12] >> 4) * 4 != thl)
        goto close;
    if (ihl == 20) {
        if (memcmp(p, f, 2) || memcmp(p + 8, f + 8, 2) || (p[6] & 0x40) != (f[6] & 0x40))
            goto close;
    } else if (memcmp(p, f, 4) || p[7] != f[7]) {
        goto close;
    }
    if (memcmp(p + ihl + 8, f + ihl + 8, 4) || memcmp(p + ihl + 14, f + ihl + 14, 2)
        || memcmp(p + ihl + 18, f + ihl + 18, hdr_end - ihl - 18)
        || be32(p + ihl + 4) != r->next_seq)
        goto close;
    r->nparts++;
    r->size += dlen;
    r->next_seq += (uint32_t)dlen;
    if ((flags & TCP_PSH) || dlen < r->mss) {
        r->psh = (flags & TCP_PSH) != 0;
        r->open = 0;
    }
    return 1;
close:
    r->open = 0;
    return 0;
}

static PyObject *run_render(Run *r, PyObject *pkts, const Py_ssize_t *next_part)
{
    int ihl = r->ihl, hdr_end = ihl + r->thl;
    if (r->nparts == 0) {
        PyObject *b = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN + r->first_len);
        if (b == NULL)
            return NULL;
        memset(PyBytes_AS_STRING(b), 0, VNET_HDR_LEN);
        memcpy(PyBytes_AS_STRING(b) + VNET_HDR_LEN, r->first, r->first_len);
        return b;
    }
    PyObject *b = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN + r->size);
    if (b == NULL)
        return NULL;
    uint8_t *h = (uint8_t *)PyBytes_AS_STRING(b), *o = h + VNET_HDR_LEN;
    memcpy(o, r->first, r->first_len);
    uint8_t *w = o + r->first_len;
    for (Py_ssize_t i = r->head; i >= 0; i = next_part[i]) {
        PyObject *p = PyList_GET_ITEM(pkts, i);
        Py_ssize_t len = PyBytes_GET_SIZE(p) - hdr_end;
        memcpy(w, PyBytes_AS_STRING(p) + hdr_end, len);
        w += len;
    }
    if (r->psh)
        o[ihl + 13] |= TCP_PSH;
    Py_ssize_t tcp_len = r->size - ihl;
    uint64_t s;
    int gso;
    if (ihl == 20) {
        put16(o + 2, (uint16_t)r->size);
        o[10] = o[11] = 0;
        put16(o + 10, fold(sum_be(o, 20, 0)));
        s = sum_be(o + 12, 8, 0);
        gso = GSO_TCPV4;
    } else {
        put16(o + 4, (uint16_t)tcp_len);
        s = sum_be(o + 8, 32, 0);
        gso = GSO_TCPV6;
    }
    uint32_t partial = (uint32_t)((s + 6 + (uint64_t)tcp_len) % 0xFFFF);
    put16(o + ihl + 16, (uint16_t)(partial ? partial : 0xFFFF));
    h[0] = F_NEEDS_CSUM;
    h[1] = (uint8_t)gso;
    h[2] = hdr_end & 0xFF; h[3] = hdr_end >> 8;
    h[4] = r->mss & 0xFF; h[5] = (r->mss >> 8) & 0xFF;
    h[6] = ihl; h[7] = 0;
    h[8] = 16; h[9] = 0;
    return b;
}

/* coalesce(packets) -> list[bytes]: TUN writes with vnet headers (the rules of vnet.coalesce).
 * None when an item is not bytes (the caller then uses the Python version). */
static PyObject *py_coalesce(PyObject *self, PyObject *pkts)
{
    if (!PyList_Check(pkts)) {
        PyErr_SetString(PyExc_TypeError, "coalesce takes a list of bytes");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(pkts);
    for (Py_ssize_t i = 0; i < n; i++)
        if (!PyBytes_Check(PyList_GET_ITEM(pkts, i)))
            Py_RETURN_NONE;
    Py_ssize_t cap = 16;
    while (cap < 2 * n)
        cap <<= 1;
    Run *runs = PyMem_Malloc(sizeof(Run) * (n ? n : 1));
    Py_ssize_t *table = PyMem_Malloc(sizeof(Py_ssize_t) * cap);  /* key → latest run */
    Py_ssize_t *next_part = PyMem_Malloc(sizeof(Py_ssize_t) * (n ? n : 1));
    PyObject *out = PyList_New(0);
    if (runs == NULL || table == NULL || next_part == NULL || out == NULL) {
        PyMem_Free(runs); PyMem_Free(table); PyMem_Free(next_part);
        Py_XDECREF(out);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < cap; i++)
        table[i] = -1;
    Py_ssize_t nruns = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *po = PyList_GET_ITEM(pkts, i);
        const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(po);
        Py_ssize_t len = PyBytes_GET_SIZE(po);
        int koff = 0, klen = flow_key(p, len, &koff);
        if (klen == 0) {
            PyObject *b = PyBytes_FromStringAndSize(NULL, VNET_HDR_LEN + len);
            if (b == NULL || PyList_Append(out, b) < 0) {
                Py_XDECREF(b);
                goto fail;
            }
            memset(PyBytes_AS_STRING(b), 0, VNET_HDR_LEN);
            memcpy(PyBytes_AS_STRING(b) + VNET_HDR_LEN, p, len);
            Py_DECREF(b);
            continue;
        }
        const uint8_t *key = p + koff;
        uint64_t h = 1469598103934665603ULL;  /* FNV-1a */
        for (int k = 0; k < klen; k++)
            h = (h ^ key[k]) * 1099511628211ULL;
        Py_ssize_t at = (Py_ssize_t)(h & (uint64_t)(cap - 1));
        while (table[at] >= 0) {
            Run *r = &runs[table[at]];
            if (r->key_len == klen && memcmp(r->key, key, klen) == 0)
                break;
            at = (at + 1) & (cap - 1);
        }
        if (table[at] >= 0) {
            Run *r = &runs[table[at]];
            if (run_take(r, p, len)) {
                next_part[i] = -1;
                if (r->tail >= 0)
                    next_part[r->tail] = i;
                else
                    r->head = i;
                r->tail = i;
                continue;
            }
        }
        Run *r = &runs[nruns];
        run_start(r, p, len, PyList_GET_SIZE(out));
        r->key = key;
        r->key_len = klen;
        table[at] = nruns++;
        if (PyList_Append(out, Py_None) < 0)
            goto fail;
    }
    for (Py_ssize_t j = 0; j < nruns; j++) {
        PyObject *b = run_render(&runs[j], pkts, next_part);
        if (b == NULL)
            goto fail;
        PyList_SetItem(out, runs[j].slot, b);  /* steals b, drops the None */
    }
    PyMem_Free(runs); PyMem_Free(table); PyMem_Free(next_part);
    return out;
fail:
    PyMem_Free(runs); PyMem_Free(table); PyMem_Free(next_part);
    Py_DECREF(out);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"open_run", accel_open_run, METH_VARARGS,
     "open_run(buf, offset, seg, keypairs, now, reject_after) -> (stop, groups, drops)"},
    {"checksum", py_checksum, METH_VARARGS, "checksum(data, initial=0) -> Internet checksum"},
    {"split_read", py_split_read, METH_O, "split_read(buf) -> IP packets of one vnet read"},
    {"coalesce", py_coalesce, METH_O, "coalesce(packets) -> TUN writes with vnet headers"},
    {"tun_read", py_tun_read, METH_VARARGS,
     "tun_read(fd, max_reads, vnet, out) -> (reads, tso_reads, bad_reads, errno)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef accel_module = {
    PyModuleDef_HEAD_INIT, "nodeagent._accel",
    "Optional compiled per-packet loops (see nodeagent/accel.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__accel(void)
{
    PyObject *m = PyModule_Create(&accel_module);
    if (m == NULL)
        return NULL;
    if (accel_wg_add(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
