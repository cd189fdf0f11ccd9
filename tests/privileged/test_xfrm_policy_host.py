"""XFRM policies through agent.kernel.xfrm against the host kernel, iproute2 as oracle.

The host kernel has XFRM netlink but no ESP, so only policies are tested
here (SAs: tests/lab/test_xfrm_sa_lab.py). Every test gets a throwaway
network namespace; the agent's socket is opened inside it (pyroute2 creates
it in a child that joins the netns), so the host's own tables are never
touched. Properties asserted:

- what the agent writes, ``ip xfrm policy`` shows with exactly the text
  iproute2 prints for the same policy (out with a pinned SPI, in without,
  fwd block, IPv6);
- what ``ip xfrm policy add`` writes, the agent reads back as the identical
  model object (dump and get);
- update replaces in place (one object, new template), delete removes;
- a batch of 500 applies in one call; refused changes come back one by one
  naming their object and errno while the rest still apply;
- kernel errors are KernelError (retryable) naming the policy and errno;
  a selector mixing families is a ConfigError before the kernel is asked.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import subprocess
import uuid
from typing import Iterator

import pytest

from agent.errors import ConfigError, KernelError
from agent.kernel.xfrm import Change, Verb, Xfrm
from agent.model import Action, Direction, Policy, Template

pytestmark = pytest.mark.privileged

net = ipaddress.ip_network
addr = ipaddress.ip_address
REQID = 0x5EA1

OUT = Policy(Direction.OUT, net("10.244.1.0/24"), net("10.244.2.0/24"), 10100,
             templates=(Template(addr("172.18.0.2"), addr("172.18.0.3"), REQID, 0x51200033),))
IN = Policy(Direction.IN, net("10.244.2.0/24"), net("10.244.1.0/24"), 10100,
            templates=(Template(addr("172.18.0.3"), addr("172.18.0.2"), REQID),))
FWD_BLOCK = Policy(Direction.FWD, net("10.244.3.0/24"), net("10.244.1.0/24"), 10999, Action.BLOCK)
OUT6 = Policy(Direction.OUT, net("fd00:1::/64"), net("fd00:2::/64"), 10200,
              templates=(Template(addr("fd00::2"), addr("fd00::3"), REQID, 0x51200033),))

# iproute2 6.1's text for each (trailing blanks are iproute2's)
IP_TEXT = {
    OUT: "src 10.244.1.0/24 dst 10.244.2.0/24 \n"
         "\tdir out priority 10100 ptype main \n"
         "\ttmpl src 172.18.0.2 dst 172.18.0.3\n"
         "\t\tproto esp spi 0x51200033 reqid 24225 mode tunnel\n",
    IN: "src 10.244.2.0/24 dst 10.244.1.0/24 \n"
        "\tdir in priority 10100 ptype main \n"
        "\ttmpl src 172.18.0.3 dst 172.18.0.2\n"
        "\t\tproto esp reqid 24225 mode tunnel\n",
    FWD_BLOCK: "src 10.244.3.0/24 dst 10.244.1.0/24 \n"
               "\tdir fwd action block priority 10999 ptype main \n",
    OUT6: "src fd00:1::/64 dst fd00:2::/64 \n"
          "\tdir out priority 10200 ptype main \n"
          "\ttmpl src fd00::2 dst fd00::3\n"
          "\t\tproto esp spi 0x51200033 reqid 24225 mode tunnel\n",
}


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"sealnet-xfrm-{uuid.uuid4().hex[:8]}"
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
    return subprocess.run(["ip", "netns", "exec", netns, "ip", *args],
                          capture_output=True, text=True, check=True).stdout


def ip_policies(netns: str) -> set[str]:
    """`ip xfrm policy` split into one text block per policy."""
    text = ip(netns, "xfrm", "policy")
    return {block for block in re.split(r"(?m)^(?=src )", text) if block}


def test_agent_written_policies_show_in_ip_exactly(netns: str, xfrm: Xfrm) -> None:
    for policy in IP_TEXT:
        xfrm.add_policy(policy)
    assert ip_policies(netns) == set(IP_TEXT.values())
    # opened inside the netns: the host's table does not have them
    host = subprocess.run(["ip", "xfrm", "policy", "get", "src", "10.244.1.0/24", "dst",
                           "10.244.2.0/24", "dir", "out"], capture_output=True, text=True)
    assert "priority 10100" not in host.stdout


def test_ip_written_policies_read_back_identical(netns: str, xfrm: Xfrm) -> None:
    ip(netns, "xfrm", "policy", "add", "src", "10.244.1.0/24", "dst", "10.244.2.0/24", "dir", "out",
       "priority", "10100", "tmpl", "src", "172.18.0.2", "dst", "172.18.0.3", "proto", "esp",
       "spi", "0x51200033", "reqid", str(REQID), "mode", "tunnel")
    ip(netns, "xfrm", "policy", "add", "src", "10.244.2.0/24", "dst", "10.244.1.0/24", "dir", "in",
       "priority", "10100", "tmpl", "src", "172.18.0.3", "dst", "172.18.0.2", "proto", "esp",
       "reqid", str(REQID), "mode", "tunnel")
    ip(netns, "xfrm", "policy", "add", "src", "10.244.3.0/24", "dst", "10.244.1.0/24", "dir", "fwd",
       "priority", "10999", "action", "block")
    ip(netns, "xfrm", "policy", "add", "src", "fd00:1::/64", "dst", "fd00:2::/64", "dir", "out",
       "priority", "10200", "tmpl", "src", "fd00::2", "dst", "fd00::3", "proto", "esp",
       "spi", "0x51200033", "reqid", str(REQID), "mode", "tunnel")

    assert sorted(xfrm.dump_policies(), key=repr) == sorted(IP_TEXT, key=repr)
    for policy in IP_TEXT:
        assert xfrm.get_policy(policy.direction, policy.src, policy.dst) == policy


def test_update_replaces_in_place_and_delete_removes(netns: str, xfrm: Xfrm) -> None:
    xfrm.add_policy(OUT)
    rotated = Policy(OUT.direction, OUT.src, OUT.dst, 10101,
                     templates=(Template(addr("172.18.0.2"), addr("172.18.0.3"), REQID, 0x51200034),))
    xfrm.update_policy(rotated)
    assert xfrm.dump_policies() == [rotated]
    assert "spi 0x51200034" in ip(netns, "xfrm", "policy")

    xfrm.delete_policy(rotated)
    assert xfrm.get_policy(OUT.direction, OUT.src, OUT.dst) is None
    assert ip(netns, "xfrm", "policy") == ""


def test_get_of_a_missing_policy_is_none(xfrm: Xfrm) -> None:
    assert xfrm.get_policy(Direction.OUT, net("10.9.0.0/16"), net("10.8.0.0/16")) is None


def test_batch_applies_many_and_reports_each_refusal(netns: str, xfrm: Xfrm) -> None:
    policies = [
        Policy(Direction.OUT, net("10.244.0.0/24"), net(f"10.{100 + i // 250}.{i % 250}.0/24"), 10100,
               templates=(Template(addr("172.18.0.2"), addr(f"172.19.{i // 250}.{i % 250}"), REQID,
                                   0x50000000 | i << 4 | 1),))
        for i in range(500)
    ]
    assert xfrm.apply(Change(Verb.ADD, p) for p in policies) == []
    assert ip(netns, "xfrm", "policy", "count").split() == ["SPD", "IN", "0", "OUT", "500", "FWD", "0"]
    assert set(xfrm.dump_policies()) == set(policies)

    # five already exist, one is new: the new one applies, each refusal names its policy
    fresh = Policy(Direction.IN, net("10.250.0.0/24"), net("10.244.0.0/24"), 10100)
    failures = xfrm.apply([Change(Verb.ADD, p) for p in policies[:5]] + [Change(Verb.ADD, fresh)])
    assert [f.change.obj for f in failures] == policies[:5]
    assert all(f.error.errno == errno.EEXIST for f in failures)
    assert f"-> {policies[3].dst} " in str(failures[3].error)
    assert xfrm.get_policy(fresh.direction, fresh.src, fresh.dst) == fresh

    assert xfrm.apply(Change(Verb.DELETE, p) for p in policies) == []
    assert xfrm.dump_policies() == [fresh]


def test_kernel_errors_name_the_policy_and_the_reason(xfrm: Xfrm) -> None:
    xfrm.add_policy(OUT)
    with pytest.raises(KernelError) as exists:
        xfrm.add_policy(OUT)
    assert exists.value.errno == errno.EEXIST
    assert str(exists.value) == ("add policy out 10.244.1.0/24 -> 10.244.2.0/24 prio=10100 allow "
                                 "spi=0x51200033: File exists (EEXIST)")

    with pytest.raises(KernelError) as missing:
        xfrm.delete_policy(IN)
    assert missing.value.errno == errno.ENOENT
    assert str(missing.value).startswith("delete policy in 10.244.2.0/24 -> 10.244.1.0/24 ")


def test_mixed_family_selector_is_a_config_error(xfrm: Xfrm) -> None:
    bad = Policy(Direction.OUT, net("10.244.1.0/24"), net("fd00:2::/64"), 10100)
    with pytest.raises(ConfigError, match="mixes IPv4 src 10.244.1.0/24 and IPv6 dst fd00:2::/64"):
        xfrm.add_policy(bad)
