"""wireguard-go through its UAPI socket: the userspace WireGuard backend.

wireguard-go (Debian's package) makes a TUN device and serves a control
socket at ``/var/run/wireguard/<ifname>.sock``. The protocol is key=value
lines: ``get=1`` followed by an empty line returns the device and its peers;
``set=1``, the settings, an empty line applies them; both end with
``errno=<n>`` and an empty line. Keys are hex there, base64 everywhere else.

    spawn_wireguard_go("sealnet_wg0", ipr)      # when the interface is missing
    dev = UserspaceBackend("sealnet_wg0")
    dev.read(); dev.set_device(private_key=..., listen_port=51871); dev.apply_peers(changes)

The socket directory is shared by every network namespace of the host
(wireguard-go in ``ip netns exec`` still uses the host's /var/run): two
namespaces cannot both have a ``wg0``, and a socket served from another
namespace is refused rather than configured by mistake.
"""

from __future__ import annotations

import base64
import ipaddress
import logging
import os
import socket
import subprocess
from typing import Any, Optional, Sequence

from agent.errors import ConfigError, KernelError
from agent.model import IPNetwork, KeyMaterial
from agent.wireguard.keys import public_key_of
from agent.wireguard.plan import DeviceState, Endpoint, PeerChange, PeerFailure, PeerState

log = logging.getLogger(__name__)

SOCKET_DIR = "/var/run/wireguard"
UAPI_TIMEOUT = 30.0


def socket_path(ifname: str) -> str:
    return os.path.join(SOCKET_DIR, f"{ifname}.sock")


def daemon_pids(ifname: str) -> list[tuple[int, bool]]:
    """wireguard-go processes serving ``ifname``: (pid, runs in our network namespace)."""
    own = os.stat("/proc/self/ns/net").st_ino
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if not argv or os.path.basename(argv[0]) != b"wireguard-go" or ifname.encode() not in argv[1:]:
                continue
            found.append((int(entry), os.stat(f"/proc/{entry}/ns/net").st_ino == own))
        except OSError:
            continue  # gone meanwhile, or a zombie
    return found


def spawn_wireguard_go(ifname: str, ipr: Any, binary: str = "wireguard-go") -> None:
    """Start ``wireguard-go <ifname>`` here; it daemonizes once its TUN and socket are up."""
    elsewhere = [pid for pid, here in daemon_pids(ifname) if not here]
    if elsewhere and _socket_alive(ifname):
        raise ConfigError(
            f"--interface: {socket_path(ifname)} is served by wireguard-go pid {elsewhere[0]} in another network "
            f"namespace; the UAPI socket directory is shared, so interface names must be unique per host"
        )
    # Without LOG_LEVEL the daemon detaches from our pipes, so run() returns.
    env = {k: v for k, v in os.environ.items() if k not in ("LOG_LEVEL", "WG_PROCESS_FOREGROUND")}
    try:
        proc = subprocess.run([binary, ifname], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelError(f"cannot run {binary} {ifname}: {e}") from e
    # Keep its own words (e.g. "UAPI listen error: unix socket in use"), not
    # the boxed "kernel has WireGuard" banner it prints on every start.
    errors = " ".join(line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                      if "error" in line.lower())
    if proc.returncode != 0 or not ipr.link_lookup(ifname=ifname) or not _socket_alive(ifname):
        raise KernelError(f"{binary} {ifname} did not bring up the interface (exit {proc.returncode}): "
                          f"{errors or 'no error output'}")


def _socket_alive(ifname: str) -> bool:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(2)
        s.connect(socket_path(ifname))
        return True
    except OSError:
        return False
    finally:
        s.close()


class UserspaceBackend:
    """wireguard-go through its UAPI socket (one connection per transaction)."""

    name = "userspace"

    def __init__(self, ifname: str) -> None:
        self.interface = ifname
        elsewhere = [pid for pid, here in daemon_pids(ifname) if not here]
        if elsewhere and not any(here for _, here in daemon_pids(ifname)):
            raise ConfigError(
                f"--interface: {socket_path(ifname)} belongs to wireguard-go pid {elsewhere[0]} in another network "
                f"namespace, not to this namespace's {ifname}; interface names must be unique per host"
            )

    def close(self) -> None:
        pass

    def read(self) -> DeviceState:
        reply = self._transact(b"get=1\n\n", "get")
        return parse_get(reply, self.interface)

    def set_device(self, private_key: Optional[KeyMaterial] = None, listen_port: Optional[int] = None,
                   fwmark: Optional[int] = None) -> None:
        lines = []
        if private_key is not None:
            lines.append(f"private_key={bytes(private_key).hex()}")
        if listen_port is not None:
            lines.append(f"listen_port={listen_port}")
        if fwmark is not None:
            lines.append(f"fwmark={fwmark}")
        what = ", ".join(n for n, v in (("private key", private_key), ("port", listen_port), ("fwmark", fwmark))
                         if v is not None)
        self._transact(("set=1\n" + "".join(x + "\n" for x in lines) + "\n").encode(), f"set ({what})")

    def apply_peers(self, changes: Sequence[PeerChange]) -> list[PeerFailure]:
        if not changes:
            return []
        try:
            self._transact(("set=1\n" + "".join(uapi_peer(c) for c in changes) + "\n").encode(), "set peers")
            return []
        except KernelError:
            # wireguard-go stops at the first bad line: redo one peer per
            # transaction to name each failure while the rest still apply.
            failures = []
            for change in changes:
                try:
                    self._transact(("set=1\n" + uapi_peer(change) + "\n").encode(), "set peer")
                except KernelError as e:
                    failures.append(PeerFailure(change, str(e)))
            return failures

    def _transact(self, request: bytes, what: str) -> str:
        path = socket_path(self.interface)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(UAPI_TIMEOUT)
        try:
            s.connect(path)
            s.sendall(request)
            buf = bytearray()
            while not buf.endswith(b"\n\n"):
                chunk = s.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except OSError as e:
            raise KernelError(f"wireguard-go {self.interface} {what} via {path}: {e.strerror or e}", e.errno) from e
        finally:
            s.close()
        text = buf.decode("ascii", errors="replace")
        tail = text.rstrip("\n").rsplit("\n", 1)[-1]
        if not tail.startswith("errno="):
            raise KernelError(f"wireguard-go {self.interface} {what}: reply ended without errno")
        code = int(tail[6:])
        if code != 0:
            raise KernelError(f"wireguard-go {self.interface} {what}: errno {code} ({os.strerror(abs(code))})",
                              abs(code))
        return text


def uapi_peer(change: PeerChange) -> str:
    """One peer's lines of a UAPI ``set=1`` transaction."""
    lines = [f"public_key={_hex(change.public_key)}"]
    if change.op == "remove":
        lines.append("remove=true")
    else:
        if change.op == "update":
            lines.append("update_only=true")
        if change.endpoint is not None:
            lines.append(f"endpoint={format_endpoint(change.endpoint)}")
        if change.keepalive is not None:
            lines.append(f"persistent_keepalive_interval={change.keepalive}")
        if change.allowed_ips is not None:
            lines.append("replace_allowed_ips=true")
            lines.extend(f"allowed_ip={n}" for n in change.allowed_ips)
    return "".join(x + "\n" for x in lines)


def parse_get(text: str, ifname: str) -> DeviceState:
    """Parse a UAPI ``get=1`` reply. The private key line becomes a public key at once.

    Written for thousands of peers (a daemon reads the device every resync):
    one pass over the lines, the lines reconcile does not use skipped by
    their first letter, addresses parsed through a memo (:func:`_network`,
    :func:`parse_endpoint`) so an unchanged device costs dictionary lookups."""
    public: Optional[str] = None
    port = fwmark = 0
    peers: dict[str, PeerState] = {}
    key: Optional[str] = None
    endpoint: Optional[Endpoint] = None
    allowed: list[IPNetwork] = []
    sec = nsec = rx = tx = keepalive = 0

    def close() -> None:
        if key is not None:
            peers[key] = PeerState(key, endpoint, frozenset(allowed), sec + nsec / 1e9, rx, tx, keepalive)

    for line in text.split("\n"):
        if line[:3] in _SKIP:
            continue
        name, _, value = line.partition("=")
        if name == "allowed_ip":
            allowed.append(_network(value))
        elif name == "public_key":
            close()
            key = _base64_of_hex(value)
            endpoint, allowed, sec, nsec, rx, tx, keepalive = None, [], 0, 0, 0, 0, 0
        elif name == "endpoint":
            endpoint = parse_endpoint(value)
        elif name == "last_handshake_time_sec":
            sec = int(value)
        elif name == "last_handshake_time_nsec":
            nsec = int(value)
        elif name == "rx_bytes":
            rx = int(value)
        elif name == "tx_bytes":
            tx = int(value)
        elif name == "persistent_keepalive_interval":
            keepalive = int(value)
        elif key is not None:
            continue  # a peer line we do not use
        elif name == "private_key":
            public = public_key_of(bytes.fromhex(value)) if value.strip("0") else None
        elif name == "listen_port":
            port = int(value)
        elif name == "fwmark":
            fwmark = int(value)
    close()
    return DeviceState("userspace", ifname, public, port, fwmark, peers)


#: Starts of the lines never used: preshared_key, protocol_version, errno, "".
_SKIP = frozenset(("pre", "pro", "err", ""))
_MEMO_MAX = 1 << 17
_networks: dict[str, IPNetwork] = {}
_endpoints: dict[str, Endpoint] = {}
_keys: dict[str, str] = {}


def _memo(cache: dict[str, Any], text: str, make: Any) -> Any:
    value = cache.get(text)
    if value is None:
        if len(cache) >= _MEMO_MAX:
            cache.clear()
        value = cache[text] = make(text)
    return value


def _network(text: str) -> IPNetwork:
    return _memo(_networks, text, _parse_network)  # type: ignore[no-any-return]


def _parse_network(text: str) -> IPNetwork:
    addr, _, prefix = text.partition("/")
    if ":" not in addr and prefix.isdigit():
        try:  # IPv4 without ipaddress's string parser: a third of the cost
            return ipaddress.IPv4Network((int.from_bytes(socket.inet_pton(socket.AF_INET, addr), "big"), int(prefix)))
        except (OSError, ValueError):
            pass
    return ipaddress.ip_network(text)


def _base64_of_hex(text: str) -> str:
    return _memo(_keys, text, lambda h: base64.b64encode(bytes.fromhex(h)).decode("ascii"))  # type: ignore[no-any-return]


def format_endpoint(endpoint: Endpoint) -> str:
    ip, port = endpoint
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def parse_endpoint(text: str) -> Endpoint:
    return _memo(_endpoints, text, _parse_endpoint)  # type: ignore[no-any-return]


def _parse_endpoint(text: str) -> Endpoint:
    host, _, port = text.rpartition(":")
    if not host.startswith("["):
        try:
            return ipaddress.IPv4Address(int.from_bytes(socket.inet_pton(socket.AF_INET, host), "big")), int(port)
        except OSError:
            pass
    return ipaddress.ip_address(host.strip("[]")), int(port)


def _hex(b64: str) -> str:
    return base64.b64decode(b64).hex()
