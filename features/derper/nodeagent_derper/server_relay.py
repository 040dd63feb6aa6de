"""The relay's fast path: a logged-in connection's read turned into RecvPacket frames in place.

:func:`relay` does what ``Conn.process`` + ``Conn.handle`` do for a logged-in connection without
a rate limit, with less work per packet (it is where a busy relay spends its time):

- the read is copied once into a bytearray and parsed there (no bytes object per frame);
- a SendPacket to a local destination that is writable becomes its RecvPacket in place: both
  frames have the same length, only the type byte and the 32-byte key differ;
- each run of consecutive packets to one destination goes to that destination's outgoing list as
  one slice of the buffer (one piece per destination per read, one write per destination per
  flush; a run of at least half the read is not even copied);
- counters are added once per read.

Every other frame — and a packet whose destination is absent, remote, closed or backed up — goes
through ``Conn.handle`` unchanged, in stream order.

:func:`tune_malloc` keeps glibc from handing each read-sized buffer back to the kernel and
faulting it in again on the next read (see its docstring).
"""

from __future__ import annotations

import ctypes
import struct
from typing import TYPE_CHECKING

from nodeagent.derp import frames as F

if TYPE_CHECKING:
    from nodeagent_derper.server_conn import Conn

_SEND = int(F.FrameType.SEND_PACKET)
_RECV = int(F.FrameType.RECV_PACKET)
_KEY_LEN = F.KEY_LEN
_HDR_LEN = F.FRAME_HEADER_LEN
_PREFIX = F.FRAME_HEADER_LEN + F.KEY_LEN  # header + key: the bytes a RecvPacket rewrites
_PKT_MAX = F.KEY_LEN + F.MAX_PACKET_SIZE
_DISCO_MAGIC = F.DISCO_MAGIC
_DISCO_FIRST = F.DISCO_MAGIC[0]
_DISCO_MIN = F.DISCO_MIN_LEN
_HDR = struct.Struct(">BI")  # frame header: type, payload length
_unpack_hdr = _HDR.unpack_from
_pack_hdr = _HDR.pack

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_malloc_tuned = False


def tune_malloc(mmap_threshold: int = 1 << 20, trim_threshold: int = 8 << 20) -> bool:
    """Serve read-sized buffers (up to 256 KB per read) from the heap and keep them there.

    With glibc's defaults a relay under load spends more time in page faults than in Python:
    every buffer above the mmap threshold (128 KB at start) is a fresh mmap, and once the
    threshold has adapted, freeing such buffers at the top of the heap trims it, so the next read
    faults the pages in again (measured: about one page fault per relayed 1400-byte packet, and
    three quarters of the process's CPU time in the kernel). Raising both thresholds keeps at
    most ``trim_threshold`` bytes of free heap. Process-wide, once; a no-op without glibc's
    ``mallopt``. Returns whether the thresholds were set.
    """
    global _malloc_tuned
    if _malloc_tuned:
        return True
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    _malloc_tuned = bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
                         and mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    return _malloc_tuned


def _emit(conn: Conn, d: Conn, mv: memoryview, start: int, end: int) -> None:
    """Append the RecvPacket frames ``mv[start:end]`` to ``d``'s outgoing list (flushed once
    per read). A run that is at least half the read is handed on without a copy (the buffer is
    never written again); a smaller one is copied, so that bytes waiting in a slow receiver's
    transport never hold on to more than twice their size."""
    piece = mv[start:end]
    d.out.append(piece if 2 * (end - start) >= len(mv)  # type: ignore[arg-type]
                 else piece.tobytes())
    if not d.dirty:
        d.dirty = True
        conn.srv.dirty.append(d)


def relay(conn: Conn, data: bytes) -> None:
    """Handle one read of a logged-in connection (no rate limit, not paused, no duplicate key)."""
    rd = conn.reader
    if rd.pending():
        buf = bytearray(rd.take_pending())
        buf += data
    else:
        buf = bytearray(data)
    mv = memoryview(buf)  # slice stores through a memoryview cost half a bytearray's
    starts = buf.startswith
    srv = conn.srv
    active = srv.active
    key = conn.key
    sent_to = conn.sent_to
    max_len = rd.max_len
    blen = len(buf)
    pos = start = 0
    d: Conn | None = None  # the destination of the run of frames that begins at ``start``
    dst = b""
    last_n = -1  # the payload length ``prefix`` was built for
    prefix = b""  # RecvPacket header + source key, written over SendPacket header + dest key
    npk = nbytes = ndisco = 0
    try:
        while blen - pos >= _HDR_LEN:
            ftype, n = _unpack_hdr(buf, pos)
            if n > max_len:
                if d is not None:
                    _emit(conn, d, mv, start, pos)
                conn.close("frame_too_large")
                return
            end = pos + _HDR_LEN + n
            if end > blen:
                break
            if ftype == _SEND and _KEY_LEN <= n <= _PKT_MAX:
                if d is None or not starts(dst, pos + _HDR_LEN):
                    if d is not None:
                        _emit(conn, d, mv, start, pos)
                    dst = bytes(buf[pos + _HDR_LEN:pos + _PREFIX])
                    d = active.get(dst)
                    if d is None or d.closed or d.write_paused:
                        d = None
                        conn.handle(ftype, bytes(buf[pos + _HDR_LEN:end]))
                        pos = end
                        if conn.closed:
                            return
                        continue
                    if dst not in sent_to:
                        sent_to.add(dst)
                    start = pos
                plen = n - _KEY_LEN
                if (plen >= _DISCO_MIN and buf[pos + _PREFIX] == _DISCO_FIRST
                        and starts(_DISCO_MAGIC, pos + _PREFIX)):
                    ndisco += 1
                if n != last_n:
                    last_n = n
                    prefix = _pack_hdr(_RECV, n) + key
                mv[pos:pos + _PREFIX] = prefix
                npk += 1
                nbytes += plen
                pos = end
                continue
            if d is not None:
                _emit(conn, d, mv, start, pos)
                d = None
            conn.handle(ftype, bytes(buf[pos + _HDR_LEN:end]))
            pos = end
            if conn.closed:
                return
            if conn.read_paused:
                break
        if d is not None:
            _emit(conn, d, mv, start, pos)
        if pos < blen:
            rd.feed(buf[pos:])
    finally:
        if npk:
            srv.packets_received += npk
            srv.bytes_received += nbytes
            srv.disco_received += ndisco
            srv.packets_sent += npk
            srv.bytes_sent += nbytes
