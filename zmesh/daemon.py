"""Running a node as a daemon: logging, signals, a clean stop.

SIGINT/SIGTERM stop the node in order (MQTT clients told, mesh sockets closed) with no stack
trace; SIGHUP reloads the trusted keys (a broken key file keeps the old ring and says why).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys

from zmesh.certs import CertError
from zmesh.config import NodeConfig
from zmesh.node import Node

log = logging.getLogger("zmesh")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


async def run(config: NodeConfig, ready_file: str | None = None) -> None:
    node = Node(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def reload() -> None:
        try:
            node.reload_trust()
        except CertError as exc:
            log.error("reload refused, keeping the old trusted keys: %s", exc)

    loop.add_signal_handler(signal.SIGHUP, reload)

    def dump_topics() -> None:
        # As Mosquitto does on SIGUSR2: the retained topic tree, into the log.
        from zmesh.topictree import render_tree

        log.info("retained topics of %s:\n%s", node.name, render_tree(node.retained_topics()))

    loop.add_signal_handler(signal.SIGUSR2, dump_topics)
    await node.start()
    try:
        if ready_file:
            # Tests and supervisors learn the bound ports from here (ports may be ephemeral).
            mqtt = node.mqtt_address
            with open(ready_file + ".tmp", "w") as f:
                json.dump({"control_port": node.control_port, "mqtt_port": mqtt[1] if mqtt else None}, f)
            os.replace(ready_file + ".tmp", ready_file)
        await stop.wait()
        log.info("stopping node %s", node.name)
    finally:
        await node.stop()
    log.info("node %s stopped", node.name)
