"""The seed tutorial's result, reproduced by hand on the lab's 3-node topology.

Properties asserted (no sealnet agent involved; this proves the lab itself):
- before any XFRM state, pod-to-pod ICMP crosses the underlay in clear;
- with hand-written ``ip xfrm`` states and policies (the tutorial's
  ``3 rfc4106(gcm(aes)) <key> 128``), every pod pair still reaches every
  other, the underlay carries only ESP with spi 0x3, and scapy decrypts the
  captured ESP with the tutorial's key to the very ICMP that was sent;
- a hand-configured kernel WireGuard mesh (``wg`` tool) leaves only UDP on
  the WireGuard port on the underlay.
"""

from __future__ import annotations

import itertools
import subprocess

import pytest
from scapy.layers.inet import ICMP, IP

from lab.capture import Capture
from lab.counters import delta, xfrm_stat
from lab.esp import DecryptError, decrypt
from lab.topology import Cluster, LabNode

pytestmark = pytest.mark.kernel_lab

# The tutorial's PSK (public, from the seed document): 16 bytes key + 4 salt.
TUTORIAL_KEY = bytes.fromhex("5c7dc606a6e901eb92accc3063c5259ddca19049")
SPI = 3


def _xfrm_by_hand(c: Cluster, node: LabNode) -> None:
    aead = ["aead", "rfc4106(gcm(aes))", "0x" + TUTORIAL_KEY.hex(), "128"]
    # One inbound SA per node: the kernel finds inbound SAs by (dst, spi), so
    # with one SPI for every peer the SA's source must be the wildcard.
    c.run(node.ns, "ip", "xfrm", "state", "add", "src", "0.0.0.0", "dst", str(node.ip), "proto", "esp",
          "spi", str(SPI), "reqid", "1", "mode", "tunnel", *aead)
    for peer in c.nodes:
        if peer is node:
            continue
        c.run(node.ns, "ip", "xfrm", "state", "add", "src", str(node.ip), "dst", str(peer.ip), "proto", "esp",
              "spi", str(SPI), "reqid", "1", "mode", "tunnel", *aead)
        c.run(node.ns, "ip", "xfrm", "policy", "add", "src", str(node.pod_cidr), "dst", str(peer.pod_cidr),
              "dir", "out", "tmpl", "src", str(node.ip), "dst", str(peer.ip), "proto", "esp", "spi", str(SPI),
              "reqid", "1", "mode", "tunnel")
        for direction in ("in", "fwd"):
            c.run(node.ns, "ip", "xfrm", "policy", "add", "src", str(peer.pod_cidr), "dst", str(node.pod_cidr),
                  "dir", direction, "tmpl", "src", "0.0.0.0", "dst", str(node.ip), "proto", "esp",
                  "reqid", "1", "mode", "tunnel")


def _ping_all(c: Cluster) -> dict[tuple[str, str], bool]:
    return {(a.ns, b.ns): c.ping(a, b) for a, b in itertools.permutations(c.pods(), 2)}


def test_tutorial_ipsec_by_hand_turns_pod_traffic_into_esp_spi_3() -> None:
    with Cluster(nodes=3, name="seed") as c:
        with Capture(c.underlay_ns, c.bridge) as before:
            reach = _ping_all(c)
        assert all(reach.values()), reach
        clear = before.summary()
        assert clear.count()["plaintext"] >= 12, clear  # 6 echo requests + 6 replies

        for node in c.nodes:
            _xfrm_by_hand(c, node)
        stats_before = {n.name: xfrm_stat(n.ns) for n in c.nodes}
        with Capture(c.underlay_ns, c.bridge) as after:
            reach = _ping_all(c)
        assert all(reach.values()), reach
        seen = after.summary()
        assert seen.kinds() == {"esp"}, seen
        assert {spi for spis in seen.spis().values() for spi in spis} == {SPI}
        assert len(seen.spis()) == 6  # every ordered node pair carried ESP
        for n in c.nodes:
            changed = delta(stats_before[n.name], xfrm_stat(n.ns))
            assert not changed, f"{n.name}: XFRM error counters moved: {changed}"

        pods = {str(p.ip) for p in c.pods()}
        inner = [decrypt(p, TUTORIAL_KEY, icv_bits=128) for p in seen.esp_packets()]
        assert len(inner) == seen.count()["esp"]
        for pkt in inner:
            assert ICMP in pkt and pkt[IP].src in pods and pkt[IP].dst in pods
        requests = {(p[IP].src, p[IP].dst) for p in inner if p[ICMP].type == 8}
        assert len(requests) == 6

        wrong = bytes(20)
        with pytest.raises(DecryptError):
            decrypt(seen.esp_packets()[0], wrong, icv_bits=128)


def _wg(c: Cluster, node: LabNode, private: str) -> None:
    c.run(node.ns, "ip", "link", "add", "wg0", "type", "wireguard")
    subprocess.run(["ip", "netns", "exec", node.ns, "wg", "set", "wg0", "listen-port", "51871",
                    "private-key", "/dev/stdin"], input=private, text=True, check=True)
    c.run(node.ns, "ip", "link", "set", "wg0", "up")


def test_kernel_wireguard_by_hand_leaves_only_udp_on_the_wireguard_port() -> None:
    with Cluster(nodes=3, name="wgs") as c:
        keys = {}
        for node in c.nodes:
            private = subprocess.run(["wg", "genkey"], capture_output=True, text=True, check=True).stdout
            public = subprocess.run(["wg", "pubkey"], input=private, capture_output=True, text=True,
                                    check=True).stdout.strip()
            keys[node.name] = public
            _wg(c, node, private)
        for node in c.nodes:
            for peer in c.nodes:
                if peer is node:
                    continue
                c.run(node.ns, "wg", "set", "wg0", "peer", keys[peer.name], "endpoint", f"{peer.ip}:51871",
                      "allowed-ips", str(peer.pod_cidr))
                c.run(node.ns, "ip", "route", "replace", str(peer.pod_cidr), "dev", "wg0")
        with Capture(c.underlay_ns, c.bridge) as cap:
            reach = _ping_all(c)
        assert all(reach.values()), reach
        seen = cap.summary()
        assert seen.kinds() == {"wireguard"}, seen
        node_ips = {str(n.ip) for n in c.nodes}
        assert all(p.src in node_ips and p.dst in node_ips for p in seen.payload()), seen
