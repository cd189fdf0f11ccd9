"""``python -m agent run``: the node agent the DaemonSet runs.

    python -m agent run --config /etc/sealnet/config.json      # NODE_NAME from the downward API
    KUBECONFIG=~/.kube/config python -m agent run --config cfg.json --node node-1   # development

Start-up checks everything before the kernel is touched: the config document
(exit 2 naming field, value and what is allowed), NODE_NAME, the API
credentials. Then, in threads: the Node watcher, the keys-file watch (IPsec)
and the HTTP endpoints; the reconcile loop runs in the main thread.

SIGTERM or SIGINT ends the process and leaves the datapath in the kernel:
pods stay encrypted across an agent upgrade, and the next agent adopts what
it finds. A keys file that is bad at start is not fatal either: the loop
waits for a good one (not ready, the kernel untouched, an Event on the Node).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from types import FrameType
from typing import Optional

from agent.cluster import config as agent_config
from agent.cluster.datapaths import open_datapath
from agent.cluster.keyswatch import KeysFile
from agent.cluster.kube import KubeApi, NodeWatcher
from agent.cluster.loop import Loop, Trigger
from agent.cluster.metrics import KernelCollector, Metrics
from agent.cluster.nodes import NodeStore
from agent.cluster.server import Health, serve
from agent.errors import ConfigError, KernelError

log = logging.getLogger(__name__)


def node_name(args: argparse.Namespace) -> str:
    name = args.node or os.environ.get("NODE_NAME", "")
    if not name:
        raise ConfigError("NODE_NAME: not set (the DaemonSet sets it from spec.nodeName; elsewhere pass --node)")
    return str(name)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = agent_config.load(args.config)
    if not args.log_level_given:
        logging.getLogger().setLevel(cfg.log_level.upper())
    name = node_name(args)
    api = KubeApi.connect(args.kubeconfig)
    log.info("starting node=%s mode=%s nodeEncryption=%s resync=%gs nodeGracePeriod=%gs ports=%d,%d",
             name, cfg.mode, cfg.node_encryption, cfg.resync_period, cfg.node_grace_period,
             cfg.health_port, cfg.metrics_port)

    metrics = Metrics()
    trigger = Trigger(metrics)
    store = NodeStore(on_change=trigger.set)

    keys: Optional[KeysFile] = None
    if cfg.keys_file is not None:
        def keys_refused(message: str) -> None:
            metrics.keys_file_errors.inc()
            metrics.keys_file_valid.set(0)
            own = store.get(name)
            try:
                api.event(name, own.uid if own else "", "KeysFileRefused",
                          f"{message}; the agent keeps the last good keys and datapath")
            except Exception as e:  # noqa: BLE001 - the Event is a courtesy; the log line and metric stand
                log.warning("could not record an Event on node=%s: %s", name, e)

        keys = KeysFile(cfg.keys_file, on_change=trigger.set, on_error=keys_refused)
        keys.load()
        metrics.keys_file_valid.set(0 if keys.error else 1)

    datapath = open_datapath(cfg)
    metrics.registry.register(KernelCollector(datapath.scrape))
    loop = Loop(name, datapath, store, keys, api, metrics, trigger, resync=cfg.resync_period,
                grace=cfg.node_grace_period)
    health = Health(loop.alive, lambda: loop.ready, lambda: loop.not_ready_reason)
    try:
        servers = serve(health, metrics, [cfg.health_port, cfg.metrics_port], args.bind)
    except OSError as e:
        raise KernelError(f"cannot listen on ports {cfg.health_port}/{cfg.metrics_port}: {e.strerror}") from e

    stop = threading.Event()

    def on_signal(signum: int, frame: Optional[FrameType]) -> None:
        log.info("signal %s: stopping, datapath left in place", signal.Signals(signum).name)
        stop.set()
        trigger.set("stop")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    watcher = NodeWatcher(api, store, metrics)
    threading.Thread(target=watcher.run, args=(stop,), name="node-watch", daemon=True).start()
    if keys is not None:
        threading.Thread(target=keys.watch, args=(stop,), name="keys-watch", daemon=True).start()
    try:
        loop.run(stop)
    finally:
        for server in servers:
            server.shutdown()
        datapath.close()
    log.info("stopped node=%s passes=%d", name, loop.passes)
    return 0

