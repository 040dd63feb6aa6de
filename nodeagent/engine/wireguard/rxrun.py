"""``ReceiveRunMixin``: a whole UDP receive buffer through ``WireGuardCore`` at once.

Owns the receive side's batch path: ``receive_buffer`` walks a GRO buffer (or one datagram) in
arrival order, handing runs of transport data of known sessions to the compiled
``_accel.open_run`` (index lookup, expiry, AEAD, replay window, padding strip in one call) via
``receive_run``, which then does the per-peer bookkeeping of ``receive_into`` once per burst
(rx bytes, roaming, confirming a responder's session, timers, the last-minute rekey).
Everything else — handshakes, cookies, unknown receivers, and with ``other`` the datagrams that
are not WireGuard (disco, STUN) — goes one datagram at a time, in order, to ``receive_into``.
Without the accelerator ``receive_run`` takes nothing and the whole buffer goes that way.
``tests/property/test_wg_rx_run_props.py`` holds both paths to the same output and state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nodeagent.accel import ACCEL
from nodeagent.engine.wireguard.config import WGConfig
from nodeagent.engine.wireguard.peer import Endpoint, Keypair, Peer

Outgoing = list[tuple[Endpoint, bytes]]

# The compiled receive run; None without the accelerator.
_open_run: Callable[..., Any] | None = ACCEL.open_run if ACCEL is not None else None


class ReceiveRunMixin:
    """Batch receive for ``WireGuardCore`` (see the module docstring)."""

    config: WGConfig
    drops: dict[str, int]
    _clock: Callable[[], float]
    _keypairs: dict[int, Keypair]
    _reject_after_time: float

    def receive_into(self, datagram: bytes, src: Endpoint, to_send: Outgoing,
                     plaintexts: list[tuple[bytes, bytes]]) -> None:
        raise NotImplementedError  # provided by WireGuardCore

    def _authentic_rx(self, peer: Peer, kp: Keypair, src: Endpoint, nbytes: int, now: float,
                      to_send: Outgoing) -> None:
        raise NotImplementedError  # provided by WireGuardCore

    def receive_buffer(self, data: bytes, seg: int, src: Endpoint, to_send: Outgoing,
                       plaintexts: list[tuple[bytes, bytes]], delivered: dict[bytes, list[bytes]],
                       other: Callable[[bytes], None] | None = None) -> int:
        """One UDP receive buffer: datagrams of ``seg`` bytes (a GRO read; the last may be
        shorter), or one datagram when ``seg`` is 0. Transport data of known sessions goes
        through ``receive_run`` (into ``delivered``), every other datagram in order through
        ``receive_into`` (into ``plaintexts``), or to ``other`` when it is not WireGuard at all
        (first byte above 4 or a nonzero second byte: disco, STUN). Returns how many datagrams
        the buffer held."""
        total = len(data)
        step = seg if 0 < seg < total else (total or 1)
        off = 0
        while True:
            stop = self.receive_run(data, seg, off, src, to_send, delivered)
            if stop >= total and total:
                break
            if stop != off:  # paused after confirming a session: resume the run
                off = stop
                continue
            d = data[off:off + step] if step < total else data
            off += step
            if other is not None and len(d) > 1 and (d[0] > 4 or d[1]):
                other(d)
            else:
                self.receive_into(d, src, to_send, plaintexts)
            if off >= total:
                break
        return (total + step - 1) // step or 1

    def receive_run(self, buf: bytes, seg: int, offset: int, src: Endpoint, to_send: Outgoing,
                    delivered: dict[bytes, list[bytes]]) -> int:
        """Transport data of known sessions in ``buf`` from ``offset`` on (datagrams of ``seg``
        bytes, as a GRO read holds them, all from ``src``; ``seg`` <= 0: one datagram), opened
        by the compiled ``open_run``: per datagram what ``receive_into`` does, the per-peer
        bookkeeping once per burst. Plaintexts are appended per peer key to ``delivered``.
        Returns the offset of the first datagram left to ``receive_into`` (``len(buf)`` when
        none); without the accelerator, ``offset`` itself. Never raises."""
        if _open_run is None:
            return offset
        now = self._clock()
        drops = self.drops
        try:
            stop, groups, dropped = _open_run(buf, offset, seg, self._keypairs, now,
                                              self._reject_after_time)
        except Exception:  # memory: the buffer is lost, not the receive loop
            drops["internal_error"] += 1
            return len(buf)
        if dropped is not None:
            drops["expired"] += dropped[0]
            drops["decrypt_failed"] += dropped[1]
            drops["replay"] += dropped[2]
            drops["bad_inner"] += dropped[3]
        for kp, pts, nbytes, nonempty in groups:
            try:
                peer = kp.peer
                if kp is not peer.next and kp.fast.confirm:
                    kp.fast.confirm = False  # left ``next`` unconfirmed: never will be now
                self._authentic_rx(peer, kp, src, nbytes, now, to_send)
                if nonempty and not peer.keepalive_at:
                    peer.keepalive_at = now + self.config.keepalive_timeout
                if pts:
                    lst = delivered.get(peer.public_key)
                    if lst is None:
                        delivered[peer.public_key] = pts
                    else:
                        lst += pts
            except Exception:  # a bug must cost one burst, not the receive loop
                drops["internal_error"] += 1
        return int(stop)
