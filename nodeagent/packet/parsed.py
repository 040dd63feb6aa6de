"""The parsed view of one IP packet: the contract between the packet parser and its consumers.

``Parsed`` is filled in place by the parser (``nodeagent.packet.parse_into``) so the hot path
reuses one object per reader instead of allocating per packet. Addresses are plain ``int``s
(IPv4 32-bit, IPv6 128-bit) because prefix matching and flow keys work on integers; render them
with :func:`nodeagent.packet.addr_str` only when a human or JSON needs them.
"""

from __future__ import annotations

# Kinds of parse result. INVALID: truncated/malformed (count and drop). UNKNOWN: well-formed IP
# but not a version we handle. The rest are valid IP packets; ``proto`` tells the transport.
INVALID = 0
UNKNOWN = 1
IPV4 = 4
IPV6 = 6

# IANA protocol numbers used across the data plane.
PROTO_ICMP = 1
PROTO_TCP = 6
PROTO_UDP = 17
PROTO_ICMPV6 = 58
PROTO_TSMP = 99
PROTO_SCTP = 132  # parsed for its ports, like TCP/UDP
PROTO_FRAGMENT = -1  # a non-first fragment: ports unknown, filter treats it specially

# TCP flag bits (as in the TCP header's flags byte).
TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_PSH = 0x08
TCP_ACK = 0x10
TCP_URG = 0x20
TCP_ECE = 0x40
TCP_CWR = 0x80

# ICMP message types the data plane looks at (ICMPv4 / ICMPv6).
ICMP4_ECHO_REPLY = 0
ICMP4_UNREACH = 3
ICMP4_ECHO_REQUEST = 8
ICMP4_TIME_EXCEEDED = 11
ICMP4_CODE_ADMIN_PROHIBITED = 13
ICMP6_UNREACH = 1
ICMP6_PACKET_TOO_BIG = 2
ICMP6_TIME_EXCEEDED = 3
ICMP6_PARAM_PROBLEM = 4
ICMP6_ECHO_REQUEST = 128
ICMP6_ECHO_REPLY = 129
ICMP6_CODE_ADMIN_PROHIBITED = 1


class Parsed:
    """One packet's header facts. Valid only when ``kind`` is IPV4 or IPV6."""

    __slots__ = (
        "kind",
        "ip_version",
        "proto",
        "src_ip",
        "dst_ip",
        "src_port",
        "dst_port",
        "tcp_flags",
        "icmp_type",
        "icmp_code",
        "ip_header_len",
        "length",
        "payload_offset",
        "is_fragment",
    )

    def __init__(self) -> None:
        self.kind = INVALID
        self.ip_version = 0
        self.proto = 0
        self.src_ip = 0
        self.dst_ip = 0
        self.src_port = 0  # 0 for protocols without ports; ICMP echo id is not a port
        self.dst_port = 0
        self.tcp_flags = 0  # TCP flags byte, 0 for non-TCP
        self.icmp_type = 0
        self.icmp_code = 0
        self.ip_header_len = 0  # bytes of IP header incl. IPv6 extension headers skipped
        self.length = 0  # total packet length in bytes
        self.payload_offset = 0  # offset of the transport payload (after TCP/UDP/ICMP header)
        self.is_fragment = False  # a non-first fragment (transport header absent)
