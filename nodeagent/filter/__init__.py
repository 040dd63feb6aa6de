"""Sans-IO stateful packet filter: Tailscale-shaped rules, compiled matching, flow tracking.

Modules: ``rules`` (``FilterRule`` and the tailcfg JSON shape), ``match`` (rules compiled into
prefix tables, plus a naive reference matcher), ``flows`` (bounded LRU of outbound flows) and
``core`` (the immutable ``Filter`` with its ``check_in`` / ``check_out`` verdicts; a policy or
shields-up change builds a new one that shares the flow table). This package re-exports their
public API.
"""

from nodeagent.filter.core import (
    ACCEPT,
    DROP_ACL,
    DROP_FRAGMENT,
    DROP_INVALID,
    DROP_NOT_LOCAL,
    DROP_SHIELDS,
    ICMP4_RESPONSES,
    ICMP6_RESPONSES,
    VERDICT_NAMES,
    Filter,
)
from nodeagent.filter.flows import FlowTable, flow_key, reply_key
from nodeagent.filter.match import Matcher, naive_match
from nodeagent.filter.rules import (
    DEFAULT_PROTOS,
    FilterRule,
    FilterRuleError,
    NetPortRange,
    parse_prefixes,
    parse_rules,
    rules_to_wire,
)

__all__ = [
    "ACCEPT",
    "DEFAULT_PROTOS",
    "DROP_ACL",
    "DROP_FRAGMENT",
    "DROP_INVALID",
    "DROP_NOT_LOCAL",
    "DROP_SHIELDS",
    "ICMP4_RESPONSES",
    "ICMP6_RESPONSES",
    "VERDICT_NAMES",
    "Filter",
    "FilterRule",
    "FilterRuleError",
    "FlowTable",
    "Matcher",
    "NetPortRange",
    "flow_key",
    "naive_match",
    "parse_prefixes",
    "parse_rules",
    "reply_key",
    "rules_to_wire",
]
