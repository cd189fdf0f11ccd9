"""Command line of the node agent.

    python -m agent run    --config /etc/sealnet/config.json [--node NAME] [--kubeconfig FILE]
    python -m agent apply  --node NAME --nodes FILE --keys FILE [--node-encryption]
    python -m agent apply  --mode wireguard --node NAME --nodes FILE --state-dir DIR
    python -m agent status [--mode ipsec|wireguard] [--json]
    python -m agent pubkey --state-dir DIR [--key-epoch N] [--allow-key-regeneration]

``run`` is the daemon the DaemonSet starts (agent.cluster.daemon): it
watches Nodes and the keys file and keeps the datapath reconciled.
``apply`` is the one-shot static mode: it programs the named node's datapath
from a static description (see agent.nodesfile) through the same plan and
reconcile code the daemon uses, and exits non-zero with one clear message on
any error. Every flag is validated before the kernel is touched.

Exit codes: 0 success, 1 runtime (kernel) failure, 2 bad input.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Optional, Sequence

from agent.errors import ConfigError, KernelError

log = logging.getLogger("sealnet.agent")

Handler = Callable[[argparse.Namespace], int]


def _handler(mode: str, command: str) -> Handler:
    # Imported lazily: `pubkey` must not pay for the XFRM codec, and each
    # datapath module owns its own commands.
    if mode == "cluster":
        from agent.cluster import daemon as datapath
    elif mode == "ipsec":
        from agent.ipsec import datapath
    else:
        from agent.wireguard import datapath
    fn: Handler = getattr(datapath, f"cmd_{command}")
    return fn


def _port(value: str) -> int:
    try:
        port = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer 1..65535, got {value!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be an integer 1..65535, got {value!r}")
    return port


def _spi_prefix(value: str) -> int:
    try:
        prefix = int(value, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a 4-bit value 0x1..0xf, got {value!r}") from None
    if not 1 <= prefix <= 0xF:
        raise argparse.ArgumentTypeError(f"must be a 4-bit value 0x1..0xf, got {value!r}")
    return prefix


def _epoch(value: str) -> int:
    try:
        epoch = int(value, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value!r}") from None
    if epoch < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value!r}")
    return epoch


def _add_wireguard_key_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key-epoch", type=_epoch, default=None,
                   help="WireGuard key epoch (the stack's rotation); a new value makes a new key pair")
    p.add_argument("--allow-key-regeneration", action="store_true",
                   help="replace a lost, corrupt or exposed WireGuard private key instead of refusing")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sealnet-agent", description="sealnet node agent")
    parser.add_argument(
        "--log-level",
        default=os.environ.get("SEALNET_LOG_LEVEL"),
        choices=["debug", "info", "warning", "error"],
        help="log verbosity (env SEALNET_LOG_LEVEL; default info, or the config's logLevel for run)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="the node agent daemon (what the DaemonSet runs)")
    run.add_argument("--config", required=True, help="the config document (the ConfigMap's config.json)")
    run.add_argument("--node", help="this node's name (default: $NODE_NAME, from the downward API)")
    run.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG, else the in-cluster service account)")
    run.add_argument("--bind", default="", help="address of the HTTP endpoints (default: all)")
    run.set_defaults(mode="cluster")

    def add_mode(p: argparse.ArgumentParser) -> None:
        p.add_argument("--mode", choices=["ipsec", "wireguard"], default="ipsec")
        p.add_argument("--netns", help="act on this named network namespace instead of the current one (ipsec)")

    apply = sub.add_parser("apply", help="program this node's datapath from a static description")
    add_mode(apply)
    apply.add_argument("--node", required=True, help="name of the local node in --nodes")
    apply.add_argument("--nodes", required=True, help="JSON node description (Kubernetes Node field names)")
    apply.add_argument("--keys", help="IPsec keys file (Cilium format); required in ipsec mode")
    apply.add_argument("--node-encryption", action="store_true", help="also encrypt node-to-node traffic")
    apply.add_argument("--spi-prefix", type=_spi_prefix, default=0x5, help="4-bit SPI prefix (ipsec)")
    apply.add_argument("--state-dir", help="directory of the WireGuard private key (wireguard)")
    apply.add_argument("--interface", default="sealnet_wg0", help="WireGuard interface name")
    apply.add_argument("--port", type=_port, default=51871, help="WireGuard listen port")
    apply.add_argument(
        "--backend", choices=["auto", "kernel", "userspace"], default="auto", help="WireGuard backend"
    )
    _add_wireguard_key_flags(apply)

    status = sub.add_parser("status", help="one line of encryption status, like `cilium status`")
    add_mode(status)
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.add_argument("--keys", help="IPsec keys file, to report the current key")
    status.add_argument("--spi-prefix", type=_spi_prefix, default=0x5, help="4-bit SPI prefix (ipsec)")
    status.add_argument("--state-dir", help="directory of the WireGuard private key (wireguard)")
    status.add_argument("--interface", default="sealnet_wg0", help="WireGuard interface name")

    pubkey = sub.add_parser("pubkey", help="print this node's WireGuard public key (creating the pair)")
    pubkey.add_argument("--state-dir", required=True)
    _add_wireguard_key_flags(pubkey)
    pubkey.set_defaults(mode="wireguard")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.log_level_given = args.log_level is not None
    logging.basicConfig(
        level=(args.log_level or "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # pyroute2 logs every parsed netlink message at DEBUG, and kernel replies
    # carry keys (WireGuard private keys, XFRM SA keys): never let it.
    # httpx/httpcore (under lightkube) log every request and connection
    # event at DEBUG, watchfiles every poll: noise, not the agent's story.
    for name in ("pyroute2", "httpx", "httpx2", "httpcore", "httpcore2", "watchfiles"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger(name).level))
    try:
        return _handler(args.mode, args.command)(args)
    except ConfigError as e:
        print(f"sealnet-agent {args.command}: {e}", file=sys.stderr)
        return 2
    except KernelError as e:
        print(f"sealnet-agent {args.command}: {e}", file=sys.stderr)
        return 1
