/* nodeagent/_accel.h: what the two source files of nodeagent._accel share.
 *
 * Owns the byte-order helpers and the WireGuard message constants used by both
 * _accel.c (module, checksum, vnet reads, coalescing) and _accel_wg.c (sessions, replay window,
 * the receive run), and the two entry points _accel_wg.c gives the module.
 */
#ifndef NODEAGENT_ACCEL_H
#define NODEAGENT_ACCEL_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define MSG_TRANSPORT 4
#define TAG 16

static inline uint16_t be16(const uint8_t *p) { return (uint16_t)((p[0] << 8) | p[1]); }
static inline uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}
static inline void put16(uint8_t *p, uint16_t v) { p[0] = v >> 8; p[1] = v & 0xFF; }
static inline void put32(uint8_t *p, uint32_t v)
{
    p[0] = v >> 24; p[1] = (v >> 16) & 0xFF; p[2] = (v >> 8) & 0xFF; p[3] = v & 0xFF;
}

/* _accel_wg.c: adds the Session type to the module (0, or -1 with an exception set). */
int accel_wg_add(PyObject *module);
/* _accel_wg.c: open_run(buf, offset, seg, keypairs, now, reject_after). */
PyObject *accel_open_run(PyObject *self, PyObject *args);

#endif
