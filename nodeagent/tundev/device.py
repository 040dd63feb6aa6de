"""The Linux TUN device adapter: one non-blocking /dev/net/tun fd, batched reads, counted writes.

``TunDevice.create`` opens the device (IFF_TUN | IFF_NO_PI: every read/write is one bare IP
packet) and configures it through :mod:`nodeagent.tundev.netconf`. With ``netns`` the link is
created here under a kernel-chosen temporary name, moved into that namespace and only then renamed
and configured, so this process stays in its own namespace, the wanted name can never collide
with (or attach to) a device of ours, and the fd keeps working after the move. Closing the fd
makes the kernel delete the link wherever it lives.

The read side is an event-loop reader that drains up to ``READ_BATCH`` reads per wakeup and
hands the packets over as one list; the write side writes each packet and counts, never raises,
the drops a full queue or a down link cause. With offloads (the default; ``offload=False`` or
``NODEAGENT_TUN_OFFLOAD=0`` turns them off) the device is opened with IFF_VNET_HDR and runs of
TCP segments written in are joined into GSO writes (:mod:`nodeagent.tundev.vnet`). With ``tso``
(``NODEAGENT_TUN_TSO=1``; by default on only with the compiled accelerator,
:mod:`nodeagent.accel`, which also runs the read loop) TUNSETOFFLOAD(CSUM|TSO4|TSO6) lets the kernel
hand over TCP segments of up to 64 KiB, which are cut into MTU-sized packets here. Callers see
plain IP packets either way.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any

from nodeagent.accel import ACCEL
from nodeagent.errors import UserError
from nodeagent.offloadenv import TUN_OFFLOAD_ENV, TUN_TSO_ENV, offload_enabled
from nodeagent.tundev import netconf
from nodeagent.tundev.vnet import (
    PLAIN_HDR,
    TUN_OFFLOADS,
    TUNSETOFFLOAD,
    VNET_HDR_LEN,
    coalesce,
    split_read,
)

TUN_DEV = "/dev/net/tun"
TUNSETIFF = 0x400454CA
TUNGETIFF = 0x800454D2
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000  # every read/write starts with a virtio_net_hdr (see vnet.py)
IFNAMSIZ = 16
_IFREQ = struct.Struct("16sH22x")  # struct ifreq: name, then ifr_flags in a 24-byte union

READ_BATCH = 64  # reads per reader wakeup; the reader fires again if more are queued
# A read must cover the largest packet the kernel might queue: MTU can be raised behind our back,
# and a short read silently truncates. os.read shrinks the result in place, so this costs little.
READ_SIZE = 65535 + VNET_HDR_LEN
TMP_NAME_PATTERN = "natun%d"  # kernel fills %d; used before a move into another namespace


def _coalesce(pkts: list[bytes]) -> list[bytes]:
    """``vnet.coalesce``, compiled when the accelerator is in use (it declines non-bytes)."""
    if ACCEL is not None:
        out = ACCEL.coalesce(pkts)
        if out is not None:
            return out  # type: ignore[no-any-return]
    return coalesce(pkts)


PLAIN_START = b"\0\0"  # virtio_net_hdr flags and gso_type both zero
_READ_FATAL = frozenset({errno.EBADF, errno.EBADFD, errno.ENODEV, errno.ENXIO})


class TunError(UserError):
    """Creating or configuring a TUN device failed; one line saying what and why."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


def validate_ifname(name: str) -> None:
    """Linux interface-name rules (dev_valid_name), checked before any syscall."""
    if not name:
        raise TunError("TUN name is empty")
    raw = name.encode("utf-8", "surrogateescape")
    if len(raw) >= IFNAMSIZ:
        raise TunError(f"TUN name {name!r} is {len(raw)} bytes; Linux allows at most "
                       f"{IFNAMSIZ - 1}")
    if name in (".", "..") or "/" in name or ":" in name or any(c.isspace() for c in name):
        raise TunError(f"TUN name {name!r} is not a valid interface name "
                       f"(no '/', ':', whitespace, '.' or '..')")


def _open_tun(name: str, flags: int) -> tuple[int, str]:
    """Open /dev/net/tun non-blocking and attach it to ``name``; return (fd, kernel's name)."""
    try:
        fd = os.open(TUN_DEV, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise TunError(f"cannot create TUN {name!r}: {TUN_DEV} does not exist (is the tun "
                       f"module loaded / the device passed into the container?)",
                       errno.ENOENT) from None
    except PermissionError as e:
        raise TunError(f"cannot create TUN {name!r}: no permission to open {TUN_DEV} "
                       f"(needs root or CAP_NET_ADMIN)", e.errno) from None
    except OSError as e:
        raise TunError(f"cannot create TUN {name!r}: opening {TUN_DEV}: {e.strerror}",
                       e.errno) from None
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(name.encode(), flags))
    except OSError as e:
        os.close(fd)
        raise TunError(f"cannot create TUN {name!r}: {_setiff_reason(e)}", e.errno) from None
    return fd, ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def _current_name(fd: int) -> str:
    ifr = fcntl.ioctl(fd, TUNGETIFF, bytes(_IFREQ.size))
    return ifr[:IFNAMSIZ].split(b"\0", 1)[0].decode()


def _setiff_reason(e: OSError) -> str:
    if e.errno == errno.EPERM:
        return "permission denied (needs CAP_NET_ADMIN)"
    if e.errno == errno.EBUSY:
        return "an interface of that name is already attached to another process"
    if e.errno == errno.EINVAL:
        return "an interface of that name exists and is not a TUN device (or bad flags)"
    return f"TUNSETIFF failed: {e.strerror}"


class TunDevice:
    """An open TUN device. Create with :meth:`create`; satisfies the Wrapper's ``TunLike``."""

    __slots__ = ("_fd", "_name", "_mtu", "_netns", "_ifindex", "_loop", "_on_packets",
                 "write_errors", "read_errors", "last_write_errno", "last_read_errno",
                 "vnet", "tso", "coalescing", "gso_writes", "tso_reads", "bad_reads")

    def __init__(self, fd: int, name: str, mtu: int, netns: str | None, ifindex: int,
                 *, vnet: bool = False, tso: bool = False) -> None:
        self._fd = fd
        self._name = name
        self._mtu = mtu
        self._netns = netns
        self._ifindex = ifindex
        self._loop: Any = None
        self._on_packets: Callable[[list[bytes]], None] | None = None
        self.write_errors = 0  # packets write_many dropped (queue full, link down, rejected)
        self.read_errors = 0
        self.last_write_errno = 0
        self.last_read_errno = 0
        self.vnet = vnet  # reads and writes carry a virtio_net_hdr; writes may be GSO
        self.tso = tso  # the kernel may hand us TSO segments (TUNSETOFFLOAD accepted)
        self.coalescing = vnet  # join TCP runs into GSO writes (off after the kernel refuses)
        self.gso_writes = 0  # writes that carried several TCP segments
        self.tso_reads = 0  # reads the kernel handed over as one large TCP segment
        self.bad_reads = 0  # reads with a virtio_net_hdr we could not make sense of

    # --- creation ---------------------------------------------------------------------------
    @classmethod
    def create(cls, name: str, *, mtu: int = 1280, addresses: Iterable[str] = (),
               routes: Iterable[str] = (), netns: str | None = None,
               offload: bool | None = None, tso: bool | None = None) -> TunDevice:
        """Open and configure a TUN: MTU, up, addresses (IPv6 without DAD), routes via it.

        ``addresses`` are ``addr/prefixlen`` strings (a bare address means a host prefix);
        ``routes`` are prefixes routed out of the device. With ``netns`` the link ends up in
        that named namespace while this process stays where it is. ``offload`` (default: the
        ``NODEAGENT_TUN_OFFLOAD`` environment, on) and ``tso`` (``NODEAGENT_TUN_TSO``, off)
        are the offloads of the module text. Raises :class:`TunError`.
        """
        vnet = offload_enabled(TUN_OFFLOAD_ENV) if offload is None else offload
        # TSO reads pay off only when the cutting runs compiled: on by default with ACCEL.
        want_tso = vnet and (offload_enabled(TUN_TSO_ENV, ACCEL is not None) if tso is None
                             else tso)
        validate_ifname(name)
        if not 68 <= mtu <= 65535:
            raise TunError(f"TUN {name!r}: MTU {mtu} outside 68..65535")
        if netns is not None:
            try:
                os.close(netconf.open_netns(netns))  # fail before creating anything
            except netconf.NetconfError as e:
                raise TunError(f"cannot create TUN {name!r}: {e}", e.errno) from None
        fd, kname = _open_tun(TMP_NAME_PATTERN if netns is not None else name,
                              IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet else 0))
        tso = False
        if want_tso:
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_OFFLOADS)
                tso = True
            except OSError:
                pass  # the framing stays; the kernel just never sends TSO segments
        try:
            if netns is not None:
                netconf.move_link_to_netns(kname, netns)
            ifindex = netconf.configure_link(kname, netns=netns,
                                             rename_to=name if netns is not None else None,
                                             mtu=mtu,
                                             addresses=addresses, routes=routes)
            kname = _current_name(fd)  # a "%d" pattern was resolved by the kernel
        except netconf.NetconfError as e:
            os.close(fd)  # the kernel deletes the half-configured link with its last fd
            raise TunError(f"cannot set up TUN {name!r}: {e}", e.errno) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, kname, mtu, netns, ifindex, vnet=vnet, tso=tso)

    # --- properties -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def mtu(self) -> int:
        return self._mtu

    @property
    def fd(self) -> int:
        """The TUN fd, or -1 once closed."""
        return self._fd

    @property
    def netns(self) -> str | None:
        return self._netns

    @property
    def ifindex(self) -> int:
        """The link's index inside the namespace it lives in."""
        return self._ifindex

    @property
    def closed(self) -> bool:
        return self._fd < 0

    # --- configuration after creation ---------------------------------------------------------
    def add_routes(self, prefixes: Iterable[str], *, replace: bool = True) -> None:
        """Route more prefixes out of the device (idempotent by default). Raises TunError."""
        for p in prefixes:
            try:
                netconf.add_route(self._name, p, netns=self._netns, replace=replace)
            except netconf.NetconfError as e:
                raise TunError(str(e), e.errno) from None

    def del_routes(self, prefixes: Iterable[str]) -> None:
        for p in prefixes:
            try:
                netconf.del_route(self._name, p, netns=self._netns)
            except netconf.NetconfError as e:
                raise TunError(str(e), e.errno) from None

    # --- data path --------------------------------------------------------------------------
    def start(self, loop: Any, on_packets: Callable[[list[bytes]], None]) -> None:
        """Deliver packets the host sends into the device, in batches, on ``loop``."""
        if self._fd < 0:
            raise TunError(f"TUN {self._name!r} is closed")
        if self._loop is not None:
            raise TunError(f"TUN {self._name!r} is already started")
        self._loop = loop
        self._on_packets = on_packets
        loop.add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        fd = self._fd
        batch: list[bytes] = []
        if ACCEL is not None:
            # The compiled loop: same reads, same splitting, one call per wakeup.
            _n, tso, bad, err = ACCEL.tun_read(fd, READ_BATCH, self.vnet, batch)
            self.tso_reads += tso
            self.bad_reads += bad
            if err:
                self._read_failed(err)
            if batch:
                cb = self._on_packets
                if cb is not None:
                    cb(batch)
            return
        read = os.read
        try:
            if self.vnet:
                for _ in range(READ_BATCH):
                    buf = read(fd, READ_SIZE)
                    if buf.startswith(PLAIN_START) and len(buf) > VNET_HDR_LEN:
                        # The common case: one packet, nothing to finish or cut.
                        batch.append(buf[VNET_HDR_LEN:])
                        continue
                    pkts = split_read(buf)
                    if len(pkts) > 1:
                        self.tso_reads += 1
                    elif not pkts:
                        self.bad_reads += 1
                    batch.extend(pkts)
            else:
                for _ in range(READ_BATCH):
                    batch.append(read(fd, READ_SIZE))
        except BlockingIOError:
            pass
        except OSError as e:
            self._read_failed(e.errno or 0)
        if batch:
            cb = self._on_packets
            if cb is not None:
                cb(batch)

    def _read_failed(self, err: int) -> None:
        self.read_errors += 1
        self.last_read_errno = err
        if err in _READ_FATAL:
            # The link is gone; stop the reader instead of spinning on a dead fd.
            self._remove_reader()

    def write_many(self, pkts: list[bytes]) -> None:
        """Write each packet to the host; failures are counted in ``write_errors`` (the last
        errno in ``last_write_errno``), never raised."""
        fd = self._fd
        if fd < 0:
            self.write_errors += len(pkts)
            return
        write = os.write
        if self.vnet:
            pkts = (_coalesce(pkts) if self.coalescing and len(pkts) > 1
                    else [PLAIN_HDR + p for p in pkts])
        for pkt in pkts:
            try:
                write(fd, pkt)
            except OSError as e:
                # EAGAIN/ENOBUFS (queue full), EIO (link down), EINVAL (not an IP packet): a
                # drop, like a full NIC queue. Raising here would abort the rest of the batch.
                if self.vnet and pkt[1]:
                    self._gso_write_failed(pkt, e)
                else:
                    self.write_errors += 1
                    self.last_write_errno = e.errno or 0
            else:
                if self.vnet and pkt[1]:
                    self.gso_writes += 1

    def _gso_write_failed(self, write: bytes, e: OSError) -> None:
        """A GSO write the kernel refused: the segments go again one by one, so a kernel that
        rejects our GSO framing costs speed, not packets; EINVAL stops the joining for good."""
        if e.errno == errno.EINVAL:
            self.coalescing = False
        for pkt in split_read(write):
            try:
                os.write(self._fd, PLAIN_HDR + pkt)
            except OSError as e2:
                self.write_errors += 1
                self.last_write_errno = e2.errno or 0
        self.last_write_errno = e.errno or 0

    def metrics_samples(self) -> list[tuple[str, str, dict[str, str], float]]:
        return [
            ("nodeagent_tun_write_errors_total", "Packets the TUN device refused to take", {},
             self.write_errors),
            ("nodeagent_tun_read_errors_total", "Failed reads from the TUN device", {},
             self.read_errors),
            ("nodeagent_tun_gso_writes_total", "TUN writes that joined several TCP segments",
             {}, self.gso_writes),
            ("nodeagent_tun_tso_reads_total", "TUN reads that held a large TCP segment (TSO)",
             {}, self.tso_reads),
            ("nodeagent_tun_bad_reads_total", "TUN reads with an offload header we could not use",
             {}, self.bad_reads),
            ("nodeagent_tun_offload", "TUN offloads in use (1) or not (0)", {"kind": "tso"},
             float(self.tso)),
            ("nodeagent_tun_offload", "TUN offloads in use (1) or not (0)", {"kind": "gro"},
             float(self.coalescing)),
        ]

    # --- teardown ---------------------------------------------------------------------------
    def _remove_reader(self) -> None:
        loop = self._loop
        self._loop = None
        if loop is not None and self._fd >= 0 and not loop.is_closed():
            loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop reading and close the fd; the kernel then deletes the link. Idempotent."""
        if self._fd < 0:
            return
        self._remove_reader()
        self._on_packets = None
        fd, self._fd = self._fd, -1
        os.close(fd)

    def __repr__(self) -> str:
        where = f" netns={self._netns!r}" if self._netns else ""
        return f"<TunDevice {self._name!r} fd={self._fd} mtu={self._mtu}{where}>"
