"""ESP SAs through agent.kernel.xfrm on the lab kernel, iproute2 as the oracle.

The host kernel has no ESP, so SAs are tested in the kernel lab (Debian's
kernel in a VM: ``python -m lab run tests/lab/test_xfrm_sa_lab.py``). Each
test gets a throwaway netns with the agent's socket opened inside it.
Properties asserted:

- what the agent writes (rfc4106(gcm(aes)) with ESN and a 1024 window;
  cbc(aes) + hmac(sha256) with a legacy 32-bit window; an output mark),
  ``ip xfrm state`` shows with exactly iproute2's text;
- what ``ip xfrm state add`` writes, the agent reads back identically
  (hmac(sha256) truncation: the kernel's default of 96 bits is the model's
  0, an explicit 128 stays 128);
- ESN: the window reaches the kernel (up to 4096) and the replay state,
  including the high 32 bits, comes back in the counters keyed by (dst, spi);
- update, delete and get; a batch of SAs in one apply;
- kernel errors are KernelError naming dst/spi/reqid and the errno, and
  never carry key material.

iproute2 prints keys: texts are compared with every key replaced by a digest
(never printed, also not in an assertion's diff).
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import re
import subprocess
import uuid
from typing import Iterator

import pytest

from agent.errors import KernelError
from agent.kernel.xfrm import Change, Verb, Xfrm
from agent.model import SA, AeadAlgorithm, CipherAuthAlgorithm, KeyMaterial

pytestmark = pytest.mark.kernel_lab

addr = ipaddress.ip_address
REQID = 0x5EA1
GCM = "rfc4106(gcm(aes))"
K20 = KeyMaterial(bytes.fromhex("0102030405060708090a0b0c0d0e0f1011121314"))
A32 = KeyMaterial(bytes.fromhex("2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40"))
E16 = KeyMaterial(bytes.fromhex("4142434445464748494a4b4c4d4e4f50"))

AEAD_ESN = SA(addr("172.18.0.2"), addr("172.18.0.3"), 0x51200023, REQID, AeadAlgorithm(GCM, K20, 128),
              replay_window=1024, esn=True)
CBC_HMAC = SA(addr("172.18.0.3"), addr("172.18.0.2"), 0x51200033, REQID,
              CipherAuthAlgorithm("hmac(sha256)", A32, "cbc(aes)", E16), replay_window=32, esn=False)
MARKED = SA(addr("172.18.0.2"), addr("172.18.0.4"), 0x51200024, REQID, AeadAlgorithm(GCM, K20, 128),
            replay_window=128, esn=False, output_mark=0x1E00, output_mark_mask=0xFF00)

# iproute2 6.1's `ip xfrm state` text for each (keys as they print: 0x + hex)
IP_TEXT = {
    AEAD_ESN: "src 172.18.0.2 dst 172.18.0.3\n"
              "\tproto esp spi 0x51200023 reqid 24225 mode tunnel\n"
              "\treplay-window 0 flag esn\n"
              "\taead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128\n"
              "\tanti-replay esn context:\n"
              "\t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x0\n"
              "\t replay_window 1024, bitmap-length 32\n"
              + "\t 00000000 00000000 00000000 00000000 00000000 00000000 00000000 00000000 \n" * 4
              + "\tsel src 0.0.0.0/0 dst 0.0.0.0/0 \n",
    CBC_HMAC: "src 172.18.0.3 dst 172.18.0.2\n"
              "\tproto esp spi 0x51200033 reqid 24225 mode tunnel\n"
              "\treplay-window 32 \n"
              "\tauth-trunc hmac(sha256) 0x2122232425262728292a2b2c2d2e2f303132333435363738393a3b3c3d3e3f40 96\n"
              "\tenc cbc(aes) 0x4142434445464748494a4b4c4d4e4f50\n"
              "\tanti-replay context: seq 0x0, oseq 0x0, bitmap 0x00000000\n"
              "\tsel src 0.0.0.0/0 dst 0.0.0.0/0 \n",
    MARKED: "src 172.18.0.2 dst 172.18.0.4\n"
            "\tproto esp spi 0x51200024 reqid 24225 mode tunnel\n"
            "\treplay-window 0 \n"
            "\toutput-mark 0x1e00/0xff00\n"
            "\taead rfc4106(gcm(aes)) 0x0102030405060708090a0b0c0d0e0f1011121314 128\n"
            "\tanti-replay esn context:\n"
            "\t seq-hi 0x0, seq 0x0, oseq-hi 0x0, oseq 0x0\n"
            "\t replay_window 128, bitmap-length 4\n"
            "\t 00000000 00000000 00000000 00000000 \n"
            "\tsel src 0.0.0.0/0 dst 0.0.0.0/0 \n",
}


def redact(text: str) -> str:
    """Replace every key iproute2 prints by a short digest of it."""
    return re.sub(r"0x[0-9a-f]{32,}",
                  lambda m: "<key " + hashlib.sha256(m.group().encode()).hexdigest()[:12] + ">", text)


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"sealnet-sa-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


@pytest.fixture
def xfrm(netns: str) -> Iterator[Xfrm]:
    with Xfrm.open(netns=netns) as x:
        yield x


def ip(netns: str, *args: str) -> str:
    done = subprocess.run(["ip", "netns", "exec", netns, "ip", *args], capture_output=True, text=True)
    assert done.returncode == 0, redact(done.stderr)
    return done.stdout


def ip_states(netns: str) -> set[str]:
    text = ip(netns, "xfrm", "state")
    return {redact(block) for block in re.split(r"(?m)^(?=src )", text) if block}


def test_agent_written_sas_show_in_ip_exactly(netns: str, xfrm: Xfrm) -> None:
    for sa in IP_TEXT:
        xfrm.add_sa(sa)
    assert ip_states(netns) == {redact(text) for text in IP_TEXT.values()}


def test_ip_written_sas_read_back_identical(netns: str, xfrm: Xfrm) -> None:
    common = ["proto", "esp", "reqid", str(REQID), "mode", "tunnel"]
    ip(netns, "xfrm", "state", "add", "src", "172.18.0.2", "dst", "172.18.0.3", "spi", "0x51200023",
       *common, "replay-window", "1024", "flag", "esn", "aead", GCM, "0x" + bytes(K20).hex(), "128")
    # `auth` leaves the truncation to the kernel (96 for hmac(sha256)): the model's 0
    ip(netns, "xfrm", "state", "add", "src", "172.18.0.3", "dst", "172.18.0.2", "spi", "0x51200033",
       *common, "replay-window", "32", "auth", "hmac(sha256)", "0x" + bytes(A32).hex(),
       "enc", "cbc(aes)", "0x" + bytes(E16).hex())
    # RFC 4868's 128 bits must be asked for, and read back as asked
    ip(netns, "xfrm", "state", "add", "src", "172.18.0.3", "dst", "172.18.0.2", "spi", "0x51200034",
       *common, "replay-window", "32", "auth-trunc", "hmac(sha256)", "0x" + bytes(A32).hex(), "128",
       "enc", "cbc(aes)", "0x" + bytes(E16).hex())
    ip(netns, "xfrm", "state", "add", "src", "172.18.0.2", "dst", "172.18.0.4", "spi", "0x51200024",
       *common, "replay-window", "128", "aead", GCM, "0x" + bytes(K20).hex(), "128",
       "output-mark", "0x1e00", "mask", "0xff00")

    rfc4868 = SA(CBC_HMAC.src, CBC_HMAC.dst, 0x51200034, REQID,
                 CipherAuthAlgorithm("hmac(sha256)", A32, "cbc(aes)", E16, auth_trunc_bits=128),
                 replay_window=32, esn=False)
    expected = set(IP_TEXT) | {rfc4868}
    assert set(xfrm.dump_sas()) == expected
    for sa in expected:
        assert xfrm.get_sa(sa.dst, sa.spi) == sa


def test_esn_window_and_replay_state_reach_the_counters(netns: str, xfrm: Xfrm) -> None:
    wide = SA(addr("172.18.0.2"), addr("172.18.0.5"), 0x51200025, REQID, AeadAlgorithm(GCM, K20, 128),
              replay_window=4096, esn=True)
    xfrm.add_sa(wide)
    assert "replay_window 4096, bitmap-length 128" in ip(netns, "xfrm", "state")
    assert xfrm.get_sa(wide.dst, wide.spi) == wide

    # a restored replay state (ip can set it) comes back with its high bits
    ip(netns, "xfrm", "state", "add", "src", "172.18.0.3", "dst", "172.18.0.2", "proto", "esp",
       "spi", "0x51200033", "reqid", str(REQID), "mode", "tunnel", "replay-window", "1024",
       "flag", "esn", "replay-oseq", "0x1e3", "replay-oseq-hi", "0x2", "replay-seq", "0x77",
       "replay-seq-hi", "0x1", "aead", GCM, "0x" + bytes(K20).hex(), "128")
    counters = xfrm.dump_sa_counters()
    assert set(counters) == {(wide.dst, wide.spi), (addr("172.18.0.2"), 0x51200033)}
    restored = counters[(addr("172.18.0.2"), 0x51200033)]
    assert (restored.oseq, restored.oseq_hi, restored.seq, restored.seq_hi) == (0x1E3, 2, 0x77, 1)
    assert restored.oseq64 == 2 << 32 | 0x1E3 and restored.seq64 == 1 << 32 | 0x77
    assert (restored.bytes, restored.packets, restored.replay, restored.integrity_failed) == (0, 0, 0, 0)


def test_update_get_and_delete(netns: str, xfrm: Xfrm) -> None:
    xfrm.add_sa(MARKED)
    remarked = SA(MARKED.src, MARKED.dst, MARKED.spi, REQID, MARKED.algorithm, MARKED.replay_window,
                  MARKED.esn, output_mark=0x2E00, output_mark_mask=0xFF00)
    xfrm.update_sa(remarked)
    assert xfrm.get_sa(MARKED.dst, MARKED.spi) == remarked
    assert "output-mark 0x2e00/0xff00" in ip(netns, "xfrm", "state")

    xfrm.delete_sa(remarked)
    assert xfrm.get_sa(MARKED.dst, MARKED.spi) is None
    assert ip(netns, "xfrm", "state") == ""


def test_kernel_errors_name_the_sa_and_never_the_key(xfrm: Xfrm) -> None:
    xfrm.add_sa(AEAD_ESN)
    with pytest.raises(KernelError) as exists:
        xfrm.add_sa(AEAD_ESN)
    assert exists.value.errno == errno.EEXIST
    assert str(exists.value) == ("add sa src=172.18.0.2 dst=172.18.0.3 spi=0x51200023 reqid=24225: "
                                 "File exists (EEXIST)")

    unknown = SA(AEAD_ESN.src, AEAD_ESN.dst, 0x51200013, REQID, AeadAlgorithm("rfc4106(nope)", K20, 128))
    with pytest.raises(KernelError) as refused:
        xfrm.add_sa(unknown)
    assert refused.value.errno == errno.ENOSYS
    assert "spi=0x51200013" in str(refused.value) and "algorithm not found" in str(refused.value)

    with pytest.raises(KernelError) as missing:
        xfrm.delete_sa(CBC_HMAC)
    assert missing.value.errno == errno.ESRCH
    assert "delete sa src=172.18.0.3 dst=172.18.0.2 spi=0x51200033" in str(missing.value)
    for error in (exists.value, refused.value, missing.value):
        for key in (K20, A32, E16):
            assert bytes(key).hex() not in str(error).lower()


def test_batch_of_sas_in_one_apply(netns: str, xfrm: Xfrm) -> None:
    sas = [SA(addr("172.18.0.2"), addr(f"172.19.{i // 250}.{i % 250 + 1}"), 0x50000000 | i << 4 | 3, REQID,
              AeadAlgorithm(GCM, K20, 128)) for i in range(300)]
    assert xfrm.apply(Change(Verb.ADD, sa) for sa in sas) == []
    assert ip(netns, "xfrm", "state", "count").split()[-1] == "300"
    assert set(xfrm.dump_sas()) == set(sas)
    assert xfrm.apply(Change(Verb.DELETE, sa) for sa in sas) == []
    assert xfrm.dump_sas() == []
