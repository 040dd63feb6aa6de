"""WireGuard message layouts: types, sizes, field offsets and the small pack/unpack helpers.

Every message starts with a little-endian u32 whose low byte is the type and whose three other
bytes are reserved zeros, so reading the u32 both checks the reserved bytes and yields the type.

- initiation (148): type, sender, ephemeral[32], static[32+16], timestamp[12+16], mac1, mac2
- response (92): type, sender, receiver, ephemeral[32], empty[0+16], mac1, mac2
- cookie reply (64): type, receiver, nonce[24], cookie[16+16]
- transport data (16 + n): type, receiver, counter u64, ciphertext of the padded packet + tag
"""

from __future__ import annotations

import struct

MSG_INITIATION = 1
MSG_RESPONSE = 2
MSG_COOKIE_REPLY = 3
MSG_TRANSPORT = 4

INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TAG_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_SIZE  # a keepalive

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

# offsets of the MACs: mac1 covers everything before it, mac2 everything before mac2
INITIATION_MAC1 = 116
RESPONSE_MAC1 = 60

U32 = struct.Struct("<I")
TYPE_AND_INDEX = struct.Struct("<II")
TRANSPORT_HEADER = struct.Struct("<IIQ")
NONCE = struct.Struct("<4xQ")  # 96-bit AEAD nonce: 32 zero bits, then the LE counter
INITIATION_HEAD = struct.Struct("<II32s48s28s")
RESPONSE_HEAD = struct.Struct("<III32s16s")
COOKIE_REPLY = struct.Struct("<II24s32s")


def pack_initiation_body(sender: int, ephemeral: bytes, static: bytes, timestamp: bytes) -> bytes:
    """The first 116 bytes of an initiation (the MACs are appended by the cookie code)."""
    return INITIATION_HEAD.pack(MSG_INITIATION, sender, ephemeral, static, timestamp)


def pack_response_body(sender: int, receiver: int, ephemeral: bytes, empty: bytes) -> bytes:
    """The first 60 bytes of a response."""
    return RESPONSE_HEAD.pack(MSG_RESPONSE, sender, receiver, ephemeral, empty)


def pack_cookie_reply(receiver: int, nonce: bytes, encrypted_cookie: bytes) -> bytes:
    return COOKIE_REPLY.pack(MSG_COOKIE_REPLY, receiver, nonce, encrypted_cookie)


def message_type(datagram: bytes | bytearray | memoryview) -> int:
    """The message type, or 0 when the datagram is too short or the reserved bytes are not 0."""
    if len(datagram) < 4:
        return 0
    t: int = U32.unpack_from(datagram)[0]
    return t if 1 <= t <= 4 else 0


def padded_length(n: int, mtu: int) -> int:
    """Length after padding ``n`` plaintext bytes to a multiple of 16 without exceeding the MTU
    (a packet already past the MTU is padded relative to its last MTU-sized unit)."""
    last = n
    if mtu and last > mtu:
        last %= mtu
    size = (last + 15) & ~15
    if mtu and size > mtu:
        size = mtu
    return n + (size - last if size > last else 0)
