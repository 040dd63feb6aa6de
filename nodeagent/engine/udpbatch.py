"""Linux UDP segmentation offloads for the WireGuard socket: GSO on send, GRO on receive.

With ``UDP_SEGMENT`` one ``sendmsg`` carries up to 64 datagrams of equal size (the last may be
shorter) to one destination, and the kernel cuts them apart — one syscall instead of dozens when
a burst of TUN packets is encrypted for the same peer. With ``UDP_GRO`` the kernel hands the
socket runs of datagrams from one source glued together, with the segment size in a control
message; ``split_gro`` cuts them apart again. The grouping and splitting here are pure functions
(tested without sockets); ``UdpOffload`` holds the per-socket switches and the fallbacks: a
device without checksum offload answers a GSO send with EIO, after which GSO stays off for the
socket, exactly the datagrams of that send are retried one by one and nothing is lost. A
destination the socket cannot even try (a port outside 0-65535, a malformed address, one of the
other address family) drops the datagrams of that group only, counted as ``bad_destination``;
``send`` never raises.

``NODEAGENT_UDP_OFFLOAD=0`` in the environment turns both off (for comparison and for kernels
or middleboxes that misbehave).
"""

from __future__ import annotations

import errno
import socket
import struct
from typing import Any

from nodeagent.offloadenv import UDP_OFFLOAD_ENV, offload_enabled

# linux/udp.h — not exported by Python's socket module.
UDP_SEGMENT = 103
UDP_GRO = 104

# The kernel's UDP_MAX_SEGMENTS (64 on every kernel that has UDP GSO; later kernels allow more).
MAX_SEGMENTS = 64
# One GSO send must fit an IP datagram; stay clear of 65535 minus IP and UDP headers.
MAX_GSO_BYTES = 65000
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)

_U16 = struct.Struct("=H")
_I32 = struct.Struct("=i")

Datagram = tuple[Any, bytes]  # (endpoint or None, payload)


def gso_groups(out: list[Datagram]) -> list[tuple[Any, list[bytes]]]:
    """Group consecutive datagrams into GSO sends, keeping their order.

    A group has one destination, at most ``MAX_SEGMENTS`` datagrams and ``MAX_GSO_BYTES``
    bytes, and every datagram but the last has the size of the first (the kernel's rule); the
    last may be shorter. Datagrams without an endpoint form groups of their own.
    """
    groups: list[tuple[Any, list[bytes]]] = []
    cur_ep: Any = None
    cur: list[bytes] | None = None
    seg = total = 0
    closed = True  # the current group cannot take more (a short datagram ended it)
    for ep, data in out:
        n = len(data)
        if (cur is not None and not closed and ep is not None and ep == cur_ep and 0 < n <= seg
                and len(cur) < MAX_SEGMENTS and total + n <= MAX_GSO_BYTES):
            cur.append(data)
            total += n
            closed = n < seg
            continue
        cur = [data]
        groups.append((ep, cur))
        cur_ep, seg, total = ep, n, n
        closed = ep is None or n == 0
    return groups


def split_gro(data: bytes, seg: int) -> list[bytes]:
    """Cut a GRO-coalesced buffer into its datagrams (all ``seg`` bytes but the last).
    A segment size that is not positive leaves the buffer whole."""
    if seg <= 0 or len(data) <= seg:
        return [data]
    return [data[i:i + seg] for i in range(0, len(data), seg)]


def gro_segment_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The UDP_GRO segment size from ``recvmsg`` ancillary data, or 0 when there is none."""
    for level, kind, cdata in ancdata:
        if level == socket.SOL_UDP and kind == UDP_GRO:
            if len(cdata) >= 4:
                return int(_I32.unpack_from(cdata)[0])
            if len(cdata) >= 2:
                return int(_U16.unpack_from(cdata)[0])
    return 0


class BadDestination(OSError):
    """A destination the socket cannot even try: a port outside 0-65535, an address of the wrong
    shape, type or family. Returned (never raised) by ``UdpOffload.send``."""


class UdpOffload:
    """Which offloads one socket uses, switched on at open and off on the first refusal."""

    __slots__ = ("gso", "gro", "counters")

    def __init__(self, sock: socket.socket, *, enabled: bool | None = None) -> None:
        self.counters = {"gso_sends": 0, "gso_fallbacks": 0, "gro_buffers": 0,
                         "bad_destination": 0}
        want = offload_enabled(UDP_OFFLOAD_ENV) if enabled is None else enabled
        self.gso = want and _try_setsockopt(sock, UDP_SEGMENT, 0)
        self.gro = want and _try_setsockopt(sock, UDP_GRO, 1)

    def send(self, sock: socket.socket, ep: Any, segs: list[bytes]) -> tuple[int, OSError | None]:
        """Send one group from ``gso_groups``. Returns how many datagrams failed and the last
        failure whose errno is not one of ``QUIET_SEND_ERRNOS`` (for the caller to log), or a
        :class:`BadDestination` when ``ep`` cannot be sent to at all (the whole group is
        dropped); never raises."""
        if len(segs) > 1 and self.gso:
            try:
                sock.sendmsg([b"".join(segs)],
                             [(socket.SOL_UDP, UDP_SEGMENT, _U16.pack(len(segs[0])))], 0, ep)
                self.counters["gso_sends"] += 1
                return 0, None
            except _BAD_DESTINATION as e:
                return self._bad_destination(ep, e, len(segs))
            except OSError as e:
                if e.errno not in _GSO_REFUSALS:
                    return len(segs), _loud(e)
                # EIO: the route's device cannot checksum-offload, so GSO is off for good.
                # EINVAL/EMSGSIZE: this group does not fit the path (a segment above the
                # MTU); the single sends below get the kernel's usual per-datagram answer.
                if e.errno in (errno.EIO, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    self.gso = False
                self.counters["gso_fallbacks"] += 1
        failed = 0
        loud: OSError | None = None
        for i, d in enumerate(segs):
            try:
                sock.sendto(d, ep)
            except _BAD_DESTINATION as e:
                # The destination itself is unusable: so is every datagram still to go to it.
                bad_n, bad = self._bad_destination(ep, e, len(segs) - i)
                return failed + bad_n, bad
            except OSError as e:
                failed += 1
                loud = _loud(e) or loud
        return failed, loud

    def _bad_destination(self, ep: Any, e: Exception, n: int) -> tuple[int, OSError]:
        self.counters["bad_destination"] += n
        return n, BadDestination(errno.EINVAL, f"bad destination {str(ep)[:80]}: {e}")


# A full buffer or an unreachable peer is a drop, as on any UDP path; nothing worth a log line.
QUIET_SEND_ERRNOS = frozenset((errno.EAGAIN, errno.ENOBUFS, errno.ENETUNREACH, errno.EHOSTUNREACH,
                               errno.ECONNREFUSED, errno.EPERM, errno.EINVAL, errno.EAFNOSUPPORT,
                               errno.EMSGSIZE))
# What socket calls raise for a destination they cannot even try: a port outside 0-65535
# (OverflowError), an address of the wrong shape or type, one of the other address family
# (gaierror; numeric addresses never reach a resolver).
_BAD_DESTINATION = (OverflowError, TypeError, ValueError, socket.gaierror)
_GSO_REFUSALS = (errno.EIO, errno.EINVAL, errno.EMSGSIZE, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


def _loud(e: OSError) -> OSError | None:
    return None if e.errno in QUIET_SEND_ERRNOS else e


def _try_setsockopt(sock: socket.socket, opt: int, value: int) -> bool:
    try:
        sock.setsockopt(socket.SOL_UDP, opt, value)
    except OSError:
        return False
    return True
