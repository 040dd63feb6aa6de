"""Protocol constants of WireGuard and the per-instance ``WGConfig`` that may override them.

The defaults are the whitepaper's (section 6) and wireguard-go's values; every timer is a field so
tests can shrink a rekey to about a second without touching module globals.
"""

from __future__ import annotations

from dataclasses import dataclass

REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.050  # min spacing of initiations accepted from one peer
UNDER_LOAD_AFTER_TIME = 1.0  # how long "under load" sticks after the trigger stops


@dataclass
class WGConfig:
    """Timers and limits of one ``WireGuardCore`` (seconds, counts)."""

    rekey_after_messages: int = REKEY_AFTER_MESSAGES
    reject_after_messages: int = REJECT_AFTER_MESSAGES
    rekey_after_time: float = REKEY_AFTER_TIME
    reject_after_time: float = REJECT_AFTER_TIME
    rekey_attempt_time: float = REKEY_ATTEMPT_TIME
    rekey_timeout: float = REKEY_TIMEOUT
    rekey_timeout_jitter: float = REKEY_TIMEOUT_JITTER_MAX
    keepalive_timeout: float = KEEPALIVE_TIMEOUT
    cookie_refresh_time: float = COOKIE_REFRESH_TIME
    handshake_initiation_rate: float = HANDSHAKE_INITIATION_RATE
    # Built-in load detector, used when no ``under_load`` callable is given: more handshake
    # messages than this within one second switch on cookie replies for UNDER_LOAD_AFTER_TIME.
    under_load_handshakes_per_s: int = 256
    under_load_after_time: float = UNDER_LOAD_AFTER_TIME
    # Per-source-address token bucket for handshakes while under load (wireguard-go: 20/s, 5).
    ratelimit_per_s: float = 20.0
    ratelimit_burst: int = 5
    mtu: int = 1420  # padding never takes a packet beyond this
    queue_max: int = 1024  # packets staged per peer while waiting for a session

    @property
    def max_handshake_attempts(self) -> int:
        return max(1, int(self.rekey_attempt_time / self.rekey_timeout))
