"""Routes and policy rules of the WireGuard datapath, as wgplan objects.

Reads and writes :class:`agent.wireguard.plan.Route` and :class:`agent.wireguard.plan.Rule`
through pyroute2's IPRoute. Ours are told apart by table and protocol
(``RTPROT_SEALNET`` on routes, FRA_PROTOCOL on rules): nothing else in the
table or the rule list is read as ours, changed or removed::

    routing = Routing(ipr)
    routes, rules = routing.read(table=51871, ifindex=idx)
    failures = routing.apply(idx, add_routes, del_routes, add_rules, del_rules)

Routes go in batches: pyroute2's ``route()`` costs most of a millisecond a
call, a batch of pre-built RTM_NEWROUTE messages a quarter of that, so
thousands of peers stay well under a second. A batch answers one ack per
message, mapped back by sequence number; whatever failed is retried alone,
so each failure is named and the rest still apply.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Any, Iterable, Sequence

from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELROUTE, RTM_NEWROUTE
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from agent.wireguard.plan import RTPROT_SEALNET, Route, Rule

log = logging.getLogger(__name__)

RTN_UNICAST = 1
RTN_UNREACHABLE = 7
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RT_TABLE_COMPAT = 252  # rtm_table when the id needs RTA_TABLE (> 255)
FIB_RULE_INVERT = 0x2
BATCH = 256  # acks of a bigger batch can overrun the socket's receive buffer
_AF = {4: socket.AF_INET, 6: socket.AF_INET6}


class Routing:
    def __init__(self, ipr: Any, protocol: int = RTPROT_SEALNET) -> None:
        self.ipr = ipr
        self.protocol = protocol

    # -- read ------------------------------------------------------------------

    def read(self, table: int, ifindex: int, priority: int) -> tuple[set[Route], set[Rule]]:
        routes: set[Route] = set()
        for msg in self.ipr.get_routes(family=socket.AF_UNSPEC, table=table):
            # get_attr, not get(): pyroute2's generic lookup costs more than
            # the dump itself when the table holds thousands of routes.
            if msg["proto"] != self.protocol or msg.get_attr("RTA_TABLE") != table:
                continue
            route = _route_of(msg, table)
            # A unicast route of ours through another device does not count
            # as present: the diff adds the right one, which replaces it.
            if route is not None and (route.type != "unicast" or msg.get_attr("RTA_OIF") == ifindex):
                routes.add(route)
        rules: set[Rule] = set()
        for version, family in _AF.items():
            for msg in self.ipr.get_rules(family=family):
                if msg.get("priority") != priority or msg.get("table") != table or msg.get("protocol") != self.protocol:
                    continue
                src = msg.get("src")
                rules.add(Rule(
                    version, priority, table,
                    src=ipaddress.ip_network(f"{src}/{msg['src_len']}") if src else None,
                    not_fwmark=msg.get("fwmark") if msg["flags"] & FIB_RULE_INVERT else None,
                ))
        return routes, rules

    # -- write -----------------------------------------------------------------

    def apply(self, ifindex: int, add_routes: Iterable[Route], del_routes: Iterable[Route],
              add_rules: Iterable[Rule], del_rules: Iterable[Rule]) -> list[str]:
        """Add (replace) and delete; returns one line per failure, [] when all applied."""
        failures = []
        adds = sorted(add_routes, key=_order)
        failures += self._batch([self._route_msg(RTM_NEWROUTE, r, ifindex) for r in adds], adds, "add")
        for rule in sorted(add_rules, key=_rule_order):
            failures += self._rule("add", rule)
        for rule in sorted(del_rules, key=_rule_order):
            failures += self._rule("del", rule)
        dels = sorted(del_routes, key=_order)
        failures += self._batch([self._route_msg(RTM_DELROUTE, r, ifindex) for r in dels], dels, "delete")
        return failures

    def _route_msg(self, command: int, route: Route, ifindex: int) -> rtmsg:
        msg = rtmsg()
        msg["family"] = _AF[route.dst.version]
        msg["dst_len"] = route.dst.prefixlen
        msg["table"] = route.table if route.table <= 255 else RT_TABLE_COMPAT
        msg["proto"] = self.protocol
        unicast = route.type == "unicast"
        msg["type"] = RTN_UNICAST if unicast else RTN_UNREACHABLE
        msg["scope"] = RT_SCOPE_LINK if unicast else RT_SCOPE_UNIVERSE
        attrs: list[tuple[str, Any]] = [("RTA_TABLE", route.table), ("RTA_DST", str(route.dst.network_address)),
                                        ("RTA_PRIORITY", route.metric)]
        if unicast and command == RTM_NEWROUTE:
            attrs.append(("RTA_OIF", ifindex))
            if route.src is not None:
                attrs.append(("RTA_PREFSRC", str(route.src)))
        msg["attrs"] = attrs
        msg["header"]["type"] = command
        # Replace, not exclusive create: a route that differs only in type or
        # source is switched in place, never removed first (no gap).
        extra = NLM_F_CREATE | NLM_F_REPLACE if command == RTM_NEWROUTE else 0
        msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | extra
        return msg

    def _batch(self, msgs: list[rtmsg], routes: Sequence[Route], verb: str) -> list[str]:
        failures = []
        for start in range(0, len(msgs), BATCH):
            chunk = msgs[start:start + BATCH]
            acked = {m["header"].get("sequence_number")
                     for m in self.ipr.nlm_request_batch(chunk, noraise=True)}
            for msg, route in zip(chunk, routes[start:start + BATCH]):
                if msg["header"].get("sequence_number") in acked:
                    continue
                # Ask again alone to learn the errno (a refused request is not answered under noraise).
                again = self._route_msg(msg["header"]["type"], route, _oif(msg))
                try:
                    tuple(self.ipr.nlm_request(again, msg_type=again["header"]["type"],
                                               msg_flags=again["header"]["flags"]))
                except NetlinkError as e:
                    if verb == "delete" and e.code == 3:  # ESRCH: already gone
                        continue
                    failures.append(f"route {verb} {_describe(route)}: {os.strerror(e.code)}")
        return failures

    def _rule(self, verb: str, rule: Rule) -> list[str]:
        spec: dict[str, Any] = {"family": _AF[rule.family], "priority": rule.priority, "table": rule.table,
                                "protocol": self.protocol}
        if rule.src is not None:
            spec.update(src=str(rule.src.network_address), src_len=rule.src.prefixlen)
        if rule.not_fwmark is not None:
            spec.update(fwmark=rule.not_fwmark, flags=FIB_RULE_INVERT)
        try:
            self.ipr.rule(verb, **spec)
        except NetlinkError as e:
            if (verb, e.code) in (("add", 17), ("del", 2)):  # EEXIST / ENOENT: already as wanted
                return []
            return [f"rule {verb} {describe_rule(rule)}: {os.strerror(e.code)}"]
        return []


def describe_rule(rule: Rule) -> str:
    sel = f"not fwmark {rule.not_fwmark:#x}" if rule.not_fwmark is not None else f"from {rule.src or 'all'}"
    return f"{rule.priority}: {sel} lookup {rule.table} (IPv{rule.family})"


def _describe(route: Route) -> str:
    src = f" src {route.src}" if route.src else ""
    return f"{route.type} {route.dst} table {route.table}{src} metric {route.metric}"


def _route_of(msg: Any, table: int) -> Route | None:
    dst = msg.get_attr("RTA_DST")
    if dst is None:
        return None  # a default route is never ours
    net = ipaddress.ip_network(f"{dst}/{msg['dst_len']}")
    metric = msg.get_attr("RTA_PRIORITY") or 0
    if msg["type"] == RTN_UNREACHABLE:
        return Route(net, table, "unreachable", None, metric)
    if msg["type"] != RTN_UNICAST:
        return None
    src = msg.get_attr("RTA_PREFSRC")
    return Route(net, table, "unicast", ipaddress.ip_address(src) if src else None, metric)


def _oif(msg: rtmsg) -> int:
    for name, value in msg["attrs"]:
        if name == "RTA_OIF":
            return int(value)
    return 0


def _order(route: Route) -> tuple[int, int, int, int]:
    return (route.dst.version, int(route.dst.network_address), route.dst.prefixlen, route.metric)


def _rule_order(rule: Rule) -> tuple[int, str, int]:
    return (rule.family, str(rule.src), rule.not_fwmark or 0)
