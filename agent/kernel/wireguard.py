"""WireGuard devices: kernel (generic netlink) and userspace (wireguard-go UAPI).

Both backends speak the same small interface, so one reconcile drives either::

    backend, created = open_backend("sealnet_wg0", "auto", ipr)
    state = backend.read()                       # DeviceState: public key, port, fwmark, peers
    backend.set_device(private_key=pair.private, listen_port=51871, fwmark=0)
    failures = backend.apply_peers(changes)      # wgplan.PeerChange list; [] when all applied
    backend.name                                 # "kernel" | "userspace"

- ``KernelBackend``: the ``wireguard`` link type and pyroute2's WireGuard
  generic netlink family. Peers go in batches (many peers per
  WG_CMD_SET_DEVICE message) rather than pyroute2's one peer per request.
- ``UserspaceBackend`` (agent.kernel.wguapi): wireguard-go, spawned as ``wireguard-go <ifname>``
  when the interface is missing, configured through its UAPI socket
  ``/var/run/wireguard/<ifname>.sock`` (``get=1`` / ``set=1``, key=value
  lines, keys in hex). That directory is shared by every network namespace
  of the host, so an interface name must be unique across namespaces;
  a socket served from another namespace is refused, not adopted.

``open_backend`` adopts an existing interface as it is (restart: no
teardown); with ``auto`` a missing one is created as a kernel link if the
kernel can, else by wireguard-go. Private keys go to the device and nowhere
else: reading a device reports its public key only.
"""

from __future__ import annotations

import base64
import errno as errnos
import ipaddress
import logging
import os
import socket
from typing import Any, Optional, Protocol, Sequence

from pyroute2 import WireGuard
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, SOL_NETLINK
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.generic.wireguard import (
    WG_CMD_SET_DEVICE, WG_GENL_VERSION, WGPEER_F_REMOVE_ME, WGPEER_F_REPLACE_ALLOWEDIPS,
    WGPEER_F_UPDATE_ONLY, wgmsg,
)

from agent.errors import ConfigError, KernelError
from agent.kernel.wguapi import UserspaceBackend, socket_path, spawn_wireguard_go
from agent.model import KeyMaterial
from agent.wireguard.plan import DeviceState, PeerChange, PeerFailure, PeerState

log = logging.getLogger(__name__)
# pyroute2 logs every message it parses at DEBUG ("message %s"), and the
# kernel's WG_CMD_GET_DEVICE reply carries the device's private key: never
# let those lines through, whatever --log-level says.
_pyroute2_log = logging.getLogger("pyroute2")
_pyroute2_log.setLevel(max(_pyroute2_log.level, logging.INFO))

NETLINK_CAP_ACK = 10  # error replies echo only the header: a refused request never carries the key back
PEERS_PER_MESSAGE = 256  # ~30 KiB per message, far below the socket buffer


class Backend(Protocol):
    name: str
    interface: str

    def read(self) -> DeviceState: ...

    def set_device(self, private_key: Optional[KeyMaterial] = None, listen_port: Optional[int] = None,
                   fwmark: Optional[int] = None) -> None: ...

    def apply_peers(self, changes: Sequence[PeerChange]) -> list[PeerFailure]: ...

    def close(self) -> None: ...


# -- selection -----------------------------------------------------------------


def link_kind(ipr: Any, ifname: str) -> Optional[str]:
    """The link's IFLA_INFO_KIND ('' when it has none), None when it does not exist."""
    index = ipr.link_lookup(ifname=ifname)
    if not index:
        return None
    return str(ipr.get_links(index[0])[0].get(("linkinfo", "kind")) or "")


def detect(ipr: Any, ifname: str) -> Optional[str]:
    """'kernel', 'userspace' or None (no such link); ConfigError for a foreign link."""
    kind = link_kind(ipr, ifname)
    if kind is None:
        return None
    if kind == "wireguard":
        return "kernel"
    if kind == "tun" and os.path.exists(socket_path(ifname)):
        return "userspace"
    raise ConfigError(
        f"--interface: {ifname} exists and is a {kind or 'typeless'} link, not a WireGuard device; "
        f"choose another name or delete it"
    )


def open_backend(ifname: str, choice: str, ipr: Any, wireguard_go: str = "wireguard-go") -> tuple[Backend, bool]:
    """The backend for ``ifname`` and whether the interface was created now."""
    if choice not in ("auto", "kernel", "userspace"):
        raise ConfigError(f"--backend: {choice!r} is not one of auto, kernel, userspace")
    found = detect(ipr, ifname)
    if found is not None:
        if choice not in ("auto", found):
            raise ConfigError(
                f"--backend {choice}: {ifname} already exists as a {found} WireGuard device; "
                f"use --backend {found} or auto, or delete the interface"
            )
        backend: Backend = KernelBackend(ifname) if found == "kernel" else UserspaceBackend(ifname)
        log.info("wireguard interface adopted interface=%s backend=%s", ifname, found)
        return backend, False
    if choice in ("auto", "kernel"):
        try:
            ipr.link("add", ifname=ifname, kind="wireguard")
            log.info("wireguard interface created interface=%s backend=kernel", ifname)
            return KernelBackend(ifname), True
        except NetlinkError as e:
            if choice == "kernel" or e.code not in (errnos.EOPNOTSUPP, errnos.ENOENT, errnos.ENODEV):
                raise KernelError(f"cannot create WireGuard link {ifname}: {os.strerror(e.code)}"
                                  f"{' (no wireguard kernel module?)' if e.code == errnos.EOPNOTSUPP else ''}",
                                  e.code) from e
            log.info("kernel WireGuard unavailable (%s); using wireguard-go", os.strerror(e.code))
    spawn_wireguard_go(ifname, ipr, wireguard_go)
    log.info("wireguard interface created interface=%s backend=userspace", ifname)
    return UserspaceBackend(ifname), True


# -- kernel --------------------------------------------------------------------


class KernelBackend:
    """Kernel WireGuard through generic netlink (pyroute2's ``wireguard`` family)."""

    name = "kernel"

    def __init__(self, ifname: str) -> None:
        self.interface = ifname
        try:
            self._wg = WireGuard()
        except NetlinkError as e:
            raise KernelError(f"wireguard generic netlink family unavailable: {os.strerror(e.code)}", e.code) from e
        self._wg.asyncore.socket.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)

    def close(self) -> None:
        self._wg.close()

    def read(self) -> DeviceState:
        try:
            msgs = self._wg.info(self.interface)
        except NetlinkError as e:
            raise KernelError(f"wireguard get {self.interface}: {os.strerror(e.code)}", e.code) from e
        public: Optional[str] = None
        port = fwmark = 0
        peers: dict[str, dict[str, Any]] = {}
        # A large device comes in several messages; a peer's allowed IPs may
        # continue in the next one under the same public key.
        for msg in msgs:
            if msg.get_attr("WGDEVICE_A_PUBLIC_KEY") is not None:
                public = msg.get_attr("WGDEVICE_A_PUBLIC_KEY").decode("ascii")
            port = msg.get_attr("WGDEVICE_A_LISTEN_PORT") or port
            fwmark = msg.get_attr("WGDEVICE_A_FWMARK") or fwmark
            for p in msg.get_attr("WGDEVICE_A_PEERS") or ():
                key = p.get_attr("WGPEER_A_PUBLIC_KEY").decode("ascii")
                entry = peers.setdefault(key, {"endpoint": None, "allowed": set(), "hs": 0.0, "rx": 0, "tx": 0})
                ep = p.get_attr("WGPEER_A_ENDPOINT")
                if ep is not None and ep.get("port"):
                    entry["endpoint"] = (ipaddress.ip_address(ep["addr"]), int(ep["port"]))
                hs = p.get_attr("WGPEER_A_LAST_HANDSHAKE_TIME")
                if hs is not None:
                    entry["hs"] = hs["tv_sec"] + hs["tv_nsec"] / 1e9
                entry["rx"] = p.get_attr("WGPEER_A_RX_BYTES") or entry["rx"]
                entry["tx"] = p.get_attr("WGPEER_A_TX_BYTES") or entry["tx"]
                for aip in p.get_attr("WGPEER_A_ALLOWEDIPS") or ():
                    entry["allowed"].add(ipaddress.ip_network(aip["addr"]))
        return DeviceState(self.name, self.interface, public, port, fwmark, {
            k: PeerState(k, v["endpoint"], frozenset(v["allowed"]), v["hs"], v["rx"], v["tx"])
            for k, v in peers.items()
        })

    def set_device(self, private_key: Optional[KeyMaterial] = None, listen_port: Optional[int] = None,
                   fwmark: Optional[int] = None) -> None:
        attrs: list[list[Any]] = [["WGDEVICE_A_IFNAME", self.interface]]
        if private_key is not None:
            attrs.append(["WGDEVICE_A_PRIVATE_KEY", base64.b64encode(bytes(private_key))])
        if listen_port is not None:
            attrs.append(["WGDEVICE_A_LISTEN_PORT", listen_port])
        if fwmark is not None:
            attrs.append(["WGDEVICE_A_FWMARK", fwmark])
        what = ", ".join(n for n, v in (("private key", private_key), ("port", listen_port), ("fwmark", fwmark))
                         if v is not None)
        try:
            self._send(attrs)
        except NetlinkError as e:
            raise KernelError(f"wireguard set {self.interface} ({what}): {os.strerror(e.code)}", e.code) from e

    def apply_peers(self, changes: Sequence[PeerChange]) -> list[PeerFailure]:
        failures: list[PeerFailure] = []
        for start in range(0, len(changes), PEERS_PER_MESSAGE):
            batch = changes[start:start + PEERS_PER_MESSAGE]
            try:
                self._send([["WGDEVICE_A_IFNAME", self.interface],
                            ["WGDEVICE_A_PEERS", [_peer_nla(c) for c in batch]]])
            except NetlinkError:
                # The kernel stops at the first bad peer of a message; redo
                # the batch peer by peer so each failure is named and the
                # others still apply (re-applying the applied ones is a no-op).
                for change in batch:
                    try:
                        self._send([["WGDEVICE_A_IFNAME", self.interface], ["WGDEVICE_A_PEERS", [_peer_nla(change)]]])
                    except NetlinkError as e:
                        failures.append(PeerFailure(change, os.strerror(e.code)))
        return failures

    def _send(self, attrs: list[list[Any]]) -> None:
        msg = wgmsg()
        msg["cmd"] = WG_CMD_SET_DEVICE
        msg["version"] = WG_GENL_VERSION
        msg["attrs"] = attrs
        tuple(self._wg.nlm_request(msg, msg_type=self._wg.prid, msg_flags=NLM_F_REQUEST | NLM_F_ACK))


def _peer_nla(change: PeerChange) -> dict[str, Any]:
    attrs: list[list[Any]] = [["WGPEER_A_PUBLIC_KEY", change.public_key]]
    if change.op == "remove":
        attrs.append(["WGPEER_A_FLAGS", WGPEER_F_REMOVE_ME])
        return {"attrs": attrs}
    flags = WGPEER_F_UPDATE_ONLY if change.op == "update" else 0
    if change.allowed_ips is not None:
        flags |= WGPEER_F_REPLACE_ALLOWEDIPS
    attrs.append(["WGPEER_A_FLAGS", flags])
    if change.endpoint is not None:
        ip, port = change.endpoint
        ep: dict[str, Any] = {"addr": str(ip), "port": port}
        if ip.version == 6:
            ep.update(flowinfo=0, scope_id=0)
        attrs.append(["WGPEER_A_ENDPOINT", ep])
    if change.allowed_ips is not None:
        attrs.append(["WGPEER_A_ALLOWEDIPS", [
            {"attrs": [["WGALLOWEDIP_A_FAMILY", socket.AF_INET if n.version == 4 else socket.AF_INET6],
                       ["WGALLOWEDIP_A_IPADDR", n.network_address.packed],
                       ["WGALLOWEDIP_A_CIDR_MASK", n.prefixlen]]}
            for n in change.allowed_ips
        ]])
    return {"attrs": attrs}
