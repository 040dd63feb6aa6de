"""TUN offloads (IFF_VNET_HDR): joining what we write in, and cutting what the kernel reads out.

With ``IFF_VNET_HDR`` every TUN read and write starts with a 10-byte ``virtio_net_hdr`` (flags,
gso_type, hdr_len, gso_size, csum_start, csum_offset; host byte order, little-endian on the
machines we run on).

On the way in, ``coalesce`` joins consecutive TCP segments of one flow from a batch of decrypted
packets into one GSO write (the userspace twin of the kernel's GRO), so the receiving host's
stack handles one large segment instead of dozens. A segment joins only when the kernel's GRO
would have joined it: same addresses, ports, ACK, window, options, TOS/TTL, next sequence
number, only ACK (PSH closes the run), no IP options or fragments, and at most ``MAX_SEGMENTS``
segments of no more than the first one's size. Everything else is written as it came, with an
empty header. The joined write carries a partial checksum, so the kernel does not verify the
segments' own TCP checksums: we do not either, because every one of them came out of a
WireGuard session whose AEAD already proves it is byte for byte what the peer sent (a peer that
sends a wrong checksum can only damage its own stream). Verifying in Python would cost more than
the join saves.

On the way out, after ``TUNSETOFFLOAD`` with CSUM|TSO4|TSO6 (opt-in, see ``device``), the
kernel's TCP hands us segments of up to 64 KiB with a partial checksum instead of MTU-sized
packets; ``split_read`` turns such a read back into the MTU-sized IP packets WireGuard carries,
each with its IP and TCP checksums complete, because the peer's TUN checks them.

All functions are pure; ``split_read`` never raises (a read it cannot make sense of yields no
packets and the caller counts it).
"""

from __future__ import annotations

import struct

from nodeagent.packet.checksum import checksum, pseudo_header_sum
from nodeagent.packet.parsed import PROTO_TCP

VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_off
VNET_HDR_LEN = VNET_HDR.size
PLAIN_HDR = bytes(VNET_HDR_LEN)  # no checksum to finish, not GSO

F_NEEDS_CSUM = 1
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80

# linux/if_tun.h
TUNSETOFFLOAD = 0x400454D0
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_OFFLOADS = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6

MAX_SEGMENTS = 64
MAX_IP_TOTAL = 65535

_FIN, _PSH, _ACK, _CWR = 0x01, 0x08, 0x10, 0x80
_H = struct.Struct("!H")
_I = struct.Struct("!I")


# --- read side: kernel → us ----------------------------------------------------------------------

def split_read(buf: bytes) -> list[bytes]:
    """One read from a vnet-header TUN → the IP packets it stands for (see the module text)."""
    if len(buf) <= VNET_HDR_LEN:
        return []
    flags, gso_type, _hdr_len, gso_size, cs_start, cs_off = VNET_HDR.unpack_from(buf)
    pkt = buf[VNET_HDR_LEN:]
    kind = gso_type & ~GSO_ECN
    if kind == GSO_NONE:
        if not flags & F_NEEDS_CSUM:
            return [pkt]
        return _finish_checksum(pkt, cs_start, cs_off)
    if kind in (GSO_TCPV4, GSO_TCPV6):
        try:
            return _segment_tcp(pkt, kind, gso_size)
        except (IndexError, struct.error, ValueError):
            return []
    return []


def _finish_checksum(pkt: bytes, start: int, off: int) -> list[bytes]:
    at = start + off
    if at + 2 > len(pkt) or start >= len(pkt):
        return []
    # The field holds the pseudo-header sum; summing it with the data gives the checksum.
    csum = checksum(memoryview(pkt)[start:])
    return [pkt[:at] + _H.pack(csum) + pkt[at + 2:]]


def _segment_tcp(pkt: bytes, kind: int, mss: int) -> list[bytes]:
    version = pkt[0] >> 4
    if version == 4 and kind == GSO_TCPV4:
        ihl = (pkt[0] & 0x0F) * 4
        if ihl < 20 or pkt[9] != PROTO_TCP:
            return []
        src = int.from_bytes(pkt[12:16], "big")
        dst = int.from_bytes(pkt[16:20], "big")
        ident = _H.unpack_from(pkt, 4)[0]
    elif version == 6 and kind == GSO_TCPV6:
        ihl = 40
        if pkt[6] != PROTO_TCP:
            return []  # extension headers: the kernel does not build TSO with them for TUN
        src = int.from_bytes(pkt[8:24], "big")
        dst = int.from_bytes(pkt[24:40], "big")
        ident = 0
    else:
        return []
    thl = (pkt[ihl + 12] >> 4) * 4
    hdr_end = ihl + thl
    if thl < 20 or hdr_end > len(pkt) or mss <= 0:
        return []
    iphdr = pkt[:ihl]
    tcphdr = pkt[ihl:hdr_end]
    seq0 = _I.unpack_from(tcphdr, 4)[0]
    tflags = tcphdr[13]
    payload = memoryview(pkt)[hdr_end:]
    n = len(payload)
    if n == 0:
        return [_tcp_packet(iphdr, tcphdr, b"", version, src, dst, ident, seq0, tflags)]
    out = []
    last = (n - 1) // mss * mss
    for off in range(0, n, mss):
        f = tflags
        if off != last:
            f &= ~(_FIN | _PSH)
        if off:
            f &= ~_CWR
        out.append(_tcp_packet(iphdr, tcphdr, payload[off:off + mss], version, src, dst,
                               (ident + off // mss) & 0xFFFF, (seq0 + off) & 0xFFFFFFFF, f))
    return out


def _tcp_packet(iphdr: bytes, tcphdr: bytes, data: memoryview | bytes, version: int, src: int,
                dst: int, ident: int, seq: int, tflags: int) -> bytes:
    ihl = len(iphdr)
    tcp = bytearray(tcphdr)
    tcp += data
    _I.pack_into(tcp, 4, seq)
    tcp[13] = tflags
    tcp[16] = tcp[17] = 0
    tlen = len(tcp)
    _H.pack_into(tcp, 16, checksum(tcp, pseudo_header_sum(src, dst, PROTO_TCP, tlen)))
    ip = bytearray(iphdr)
    if version == 4:
        _H.pack_into(ip, 2, ihl + tlen)
        _H.pack_into(ip, 4, ident)
        ip[10] = ip[11] = 0
        _H.pack_into(ip, 10, checksum(ip))
    else:
        _H.pack_into(ip, 4, tlen)
    ip += tcp
    return bytes(ip)


# --- write side: us → kernel ---------------------------------------------------------------------

def coalesce(pkts: list[bytes]) -> list[bytes]:
    """Decrypted packets → TUN writes, each with its vnet header, runs of TCP joined (in order
    of each run's first packet; the kernel reorders nothing within a flow)."""
    out: list[bytes] = []
    open_runs: dict[bytes, _Run] = {}
    runs: list[_Run] = []
    for pkt in pkts:
        key = _flow_key(pkt)
        if key is None:
            out.append(PLAIN_HDR + pkt)
            continue
        run = open_runs.get(key)
        if run is not None and run.take(pkt):
            continue
        run = _Run(pkt, len(out))
        open_runs[key] = run
        runs.append(run)
        out.append(b"")  # the run's write, filled in below
    for run in runs:
        out[run.slot] = run.render()
    return out


def _flow_key(pkt: bytes) -> bytes | None:
    """A key for a TCP segment that may take part in a run, or None (written alone)."""
    n = len(pkt)
    if n < 40:
        return None
    b0 = pkt[0]
    if b0 == 0x45:  # IPv4 without options
        if (pkt[9] != PROTO_TCP or _H.unpack_from(pkt, 6)[0] & 0x3FFF
                or _H.unpack_from(pkt, 2)[0] != n):
            return None  # not TCP, a fragment, or padded
        return pkt[12:24]  # addresses + ports
    if b0 >> 4 == 6:
        if n < 60 or pkt[6] != PROTO_TCP or _H.unpack_from(pkt, 4)[0] + 40 != n:
            return None
        return pkt[8:44]
    return None


class _Run:
    """Consecutive segments of one flow being joined into one GSO write."""

    __slots__ = ("first", "ihl", "thl", "mss", "parts", "size", "next_seq", "open", "slot",
                 "psh")

    def __init__(self, pkt: bytes, slot: int) -> None:
        self.first = pkt
        self.slot = slot
        self.ihl = ihl = 20 if pkt[0] == 0x45 else 40
        self.thl = thl = (pkt[ihl + 12] >> 4) * 4
        hdr_end = ihl + thl
        self.mss = len(pkt) - hdr_end
        self.parts: list[bytes] = []
        self.size = len(pkt)
        self.psh = False
        # Only a pure data segment (ACK, payload, no PSH) starts a run that others can join.
        self.open = thl >= 20 and self.mss > 0 and pkt[ihl + 13] == _ACK
        self.next_seq = (_I.unpack_from(pkt, ihl + 4)[0] + self.mss) & 0xFFFFFFFF \
            if self.open else 0

    def take(self, pkt: bytes) -> bool:
        if not self.open:
            return False
        first, ihl, thl = self.first, self.ihl, self.thl
        hdr_end = ihl + thl
        dlen = len(pkt) - hdr_end
        if (dlen <= 0 or dlen > self.mss or len(self.parts) + 1 >= MAX_SEGMENTS
                or self.size + dlen > MAX_IP_TOTAL):
            self.open = False
            return False
        flags = pkt[ihl + 13]
        if (flags & ~_PSH) != _ACK or (pkt[ihl + 12] >> 4) * 4 != thl:
            self.open = False
            return False
        if ihl == 20:
            # version/IHL/TOS, TTL/protocol must match; length, ID, checksum may differ
            if (pkt[:2] != first[:2] or pkt[8:10] != first[8:10]
                    or pkt[6] & 0x40 != first[6] & 0x40):
                self.open = False
                return False
        elif pkt[:4] != first[:4] or pkt[7] != first[7]:  # traffic class, flow label, hop limit
            self.open = False
            return False
        # ACK number, header length/flags-free word, window; then options.
        if (pkt[ihl + 8:ihl + 12] != first[ihl + 8:ihl + 12]
                or pkt[ihl + 14:ihl + 16] != first[ihl + 14:ihl + 16]
                or pkt[ihl + 18:hdr_end] != first[ihl + 18:hdr_end]
                or _I.unpack_from(pkt, ihl + 4)[0] != self.next_seq):
            self.open = False
            return False
        self.parts.append(pkt[hdr_end:])
        self.size += dlen
        self.next_seq = (self.next_seq + dlen) & 0xFFFFFFFF
        if flags & _PSH or dlen < self.mss:
            self.psh = bool(flags & _PSH)
            self.open = False  # the run ends here, as it would in the kernel's GRO
        return True

    def render(self) -> bytes:
        first = self.first
        if not self.parts:
            return PLAIN_HDR + first
        ihl, thl = self.ihl, self.thl
        hdr_end = ihl + thl
        body = bytearray(first)
        if self.psh:
            body[ihl + 13] |= _PSH
        tcp_len = self.size - ihl
        if ihl == 20:
            _H.pack_into(body, 2, self.size)
            body[10] = body[11] = 0
            _H.pack_into(body, 10, checksum(memoryview(body)[:20]))
            src = int.from_bytes(first[12:16], "big")
            dst = int.from_bytes(first[16:20], "big")
            gso = GSO_TCPV4
        else:
            _H.pack_into(body, 4, tcp_len)
            src = int.from_bytes(first[8:24], "big")
            dst = int.from_bytes(first[24:40], "big")
            gso = GSO_TCPV6
        # A partial checksum: the folded pseudo-header sum; the kernel adds the segment's sum.
        partial = pseudo_header_sum(src, dst, PROTO_TCP, tcp_len) % 0xFFFF or 0xFFFF
        _H.pack_into(body, ihl + 16, partial)
        hdr = VNET_HDR.pack(F_NEEDS_CSUM, gso, hdr_end, self.mss, ihl, 16)
        return hdr + bytes(body) + b"".join(self.parts)

