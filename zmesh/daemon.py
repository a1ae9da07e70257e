"""Running a node as a daemon: logging, signals, a clean stop.

SIGINT/SIGTERM stop the node in order (MQTT clients told, mesh sockets closed) with no stack
trace; SIGHUP reloads the trusted keys (a broken key file keeps the old ring and says why)
and the MQTT password and ACL files (likewise: broken files keep the old users and rules).
A node with a data_dir writes its pid there (``zmesh.pid``) for ``zmesh node reload``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from zmesh import eventloop
from zmesh.certs import CertError
from zmesh.config import NodeConfig
from zmesh.node import Node
from zmesh.pidfile import pid_file_path, remove_pid_file, write_pid_file

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
    log.debug("event loop: %s", type(loop).__module__.split(".")[0])
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def reload() -> None:
        try:
            node.reload_trust()
        except CertError as exc:
            log.error("reload refused, keeping the old trusted keys: %s", exc)
        # Independent of the keys: a broken key directory must not block a users/ACL reload,
        # nor the reverse. Two small files, parsed (not hashed): fine on the event loop.
        auth = node.auth
        if auth.password_file is not None or auth.acl_file is not None:
            problem = auth.reload()
            if problem:
                log.error("reload refused, keeping the old users and ACLs: %s", problem)
            else:
                log.info("users and ACLs reloaded from %s (generation %d)",
                         " and ".join(str(p) for p in (auth.password_file, auth.acl_file) if p), auth.generation)

    loop.add_signal_handler(signal.SIGHUP, reload)

    def dump_topics() -> None:
        # As Mosquitto does on SIGUSR2: the retained topic tree, into the log.
        from zmesh.topictree import render_tree

        log.info("retained topics of %s:\n%s", node.name, render_tree(node.retained_topics()))

    loop.add_signal_handler(signal.SIGUSR2, dump_topics)
    await node.start()
    pid_file = pid_file_path(config.data_dir)
    try:
        if pid_file is not None:
            write_pid_file(pid_file)  # for `zmesh node reload --config` (see zmesh.pidfile)
        if ready_file:
            # Tests and supervisors learn the bound ports from here (ports may be ephemeral).
            mqtt = node.mqtt_address
            listeners = node.mqtt_server.listeners if node.mqtt_server is not None else []
            with open(ready_file + ".tmp", "w") as f:
                json.dump({
                    "control_port": node.control_port,
                    "mqtt_port": mqtt[1] if mqtt else None,
                    # every listener, in config order: {"key", "scheme", "host", "port"}
                    "mqtt_listeners": [
                        {"key": b.config.key, "scheme": b.config.scheme, "host": b.address[0], "port": b.address[1]}
                        for b in listeners
                    ],
                }, f)
            os.replace(ready_file + ".tmp", ready_file)
        await stop.wait()
        log.info("stopping node %s", node.name)
    finally:
        if pid_file is not None:
            remove_pid_file(pid_file)
        await node.stop()
    log.info("node %s stopped", node.name)


# ---------------------------------------------------------------------------- `zmesh node run`

NODE_ARGS_ENV = "ZMESH_NODE_RUN"


def exec_node(config_file: Path | None, overrides: dict[str, Any], ready_file: str | None) -> NoReturn:
    """Replace this process (same pid, so signals and supervisors are unaffected) with
    ``python -m zmesh.daemon``, which runs the node.

    Why not run it here: the CLI's argument parser (typer) imports pydantic to coerce
    options, ~7 MB of RSS a node would carry for its whole life for nothing."""
    args = {"config": str(config_file) if config_file else None, "overrides": overrides, "ready_file": ready_file}
    os.environ[NODE_ARGS_ENV] = json.dumps(args)
    sys.stdout.flush()
    sys.stderr.flush()
    # The original arguments ride along (ignored) so that ps still shows which node this is.
    os.execv(sys.executable, [sys.executable, "-m", "zmesh.daemon", *sys.argv[1:]])


def main() -> int:
    """Run the node ``exec_node`` described; errors as the CLI reports them."""
    import zmq

    from zmesh.config import ConfigError, load_config
    from zmesh.keys import KeyFileError
    from zmesh.store import StoreError

    try:
        args = json.loads(os.environ.pop(NODE_ARGS_ENV))
    except (KeyError, ValueError):
        print(f"Error: run nodes with `zmesh node run` (no {NODE_ARGS_ENV} here)", file=sys.stderr)
        return 2
    try:
        config = load_config(Path(args["config"]) if args["config"] else None, args["overrides"])
    except ConfigError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log.level)
    try:
        eventloop.run(run(config, args["ready_file"]))
    except (CertError, KeyFileError, StoreError, ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        print(f"Error: mesh socket: {exc} (is {config.mesh.listen} free?)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
