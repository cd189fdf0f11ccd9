"""agent.ipsec.datapath.status_line: the seed's `cilium status` line, and a rotation in progress."""

from __future__ import annotations

from agent.ipsec.datapath import status_line

BASE = {"mode": "ipsec", "key": 4, "perNodeKeys": True, "peers": 3, "peersOnCurrentKey": 3,
        "egressKeys": {}, "blockedPolicies": 0, "sas": 6, "maxSeq": 0x1E3, "errors": 0,
        "keysInstalled": [4], "peersByEgressKey": {"4": 3}, "seqWarnings": []}


def test_steady_state_is_the_seed_line() -> None:
    assert status_line(BASE) == "Encryption: IPsec [key 4+, peers 3/3 on key 4, max seq 0x1e3, errors 0]"


def test_rotation_in_progress_names_keys_and_egress() -> None:
    s = {**BASE, "peersOnCurrentKey": 1, "keysInstalled": [3, 4], "peersByEgressKey": {"3": 2, "4": 1}}
    assert status_line(s) == ("Encryption: IPsec [key 4+, peers 1/3 on key 4, rotating: keys 3,4 installed, "
                              "egress 3:2 4:1, max seq 0x1e3, errors 0]")


def test_sequence_warning_without_esn() -> None:
    line = status_line({**BASE, "seqWarnings": ["0x51200034"]})
    assert line.splitlines()[1] == ("WARNING: SAs without ESN past 2^31 packets (replace them before 2^32): "
                                    "0x51200034")
