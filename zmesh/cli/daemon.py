"""Running a node as a daemon: logging, signals, a clean stop.

SIGINT/SIGTERM drain the node (``Node.drain``: not ready at once, MQTT clients told, jobs
handed back, messages flushed, peers told bye) within ``node.shutdown_grace`` seconds, then
exit 0, with no stack trace; a drain that overruns the grace is cut short (exit 1). SIGHUP
reloads the trusted keys (a broken key file keeps the old ring and says why)
and the MQTT password and ACL files (likewise: broken files keep the old users and rules).
A node with a data_dir writes its pid there (``zmesh.pid``) for ``zmesh node reload``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, NoReturn

from zmesh import eventloop
from zmesh.cli.pidfile import pid_file_path, remove_pid_file, write_pid_file
from zmesh.config import NodeConfig
from zmesh.node import Node
from zmesh.security.certs import CertError

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
        from zmesh.retained.topictree import render_tree

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
                    "events_port": node.mesh.pub_port if node.mesh else None,
                    "jobs_port": node.mesh.pull_port if node.mesh else None,
                    "http_port": node.ops.address[1] if node.ops is not None and node.ops.address else None,
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
        started = loop.time()
        try:
            async with asyncio.timeout(config.shutdown_grace):
                await node.drain()
        except TimeoutError:
            # Kubernetes kills at its own grace anyway; better to say what happened first.
            log.error("drain of node %s took over node.shutdown_grace (%g s): stopping now",
                      node.name, config.shutdown_grace)
            logging.shutdown()
            os._exit(1)  # the half-closed sockets and ZeroMQ context must not hold the exit
    log.info("node %s stopped (drained in %.2f s)", node.name, loop.time() - started)


# ---------------------------------------------------------------------------- `zmesh node run`

NODE_ARGS_ENV = "ZMESH_NODE_RUN"


def exec_node(config_file: Path | None, overrides: dict[str, Any], ready_file: str | None) -> NoReturn:
    """Replace this process (same pid, so signals and supervisors are unaffected) with
    ``python -m zmesh.cli.daemon``, which runs the node.

    Why not run it here: the CLI's argument parser (typer) imports pydantic to coerce
    options, ~7 MB of RSS a node would carry for its whole life for nothing."""
    args = {"config": str(config_file) if config_file else None, "overrides": overrides, "ready_file": ready_file}
    os.environ[NODE_ARGS_ENV] = json.dumps(args)
    sys.stdout.flush()
    sys.stderr.flush()
    # -P: `python -m` would put the working directory first on sys.path, and a node started
    # from a directory holding a zmesh/ folder (the parent of a clone, or one anyone can
    # write to) would run that code instead of the installed package. PYTHONPATH and the
    # installed packages still count, as they did for the CLI that execs us.
    # The original arguments ride along (ignored) so that ps still shows which node this is.
    os.execv(sys.executable, [sys.executable, "-P", "-m", "zmesh.cli.daemon", *sys.argv[1:]])


def main() -> int:
    """Run the node ``exec_node`` described; errors as the CLI reports them."""
    import zmq

    from zmesh.config import ConfigError, load_config
    from zmesh.mqtt.sessionstore import SessionStoreError
    from zmesh.retained.store import StoreError
    from zmesh.security.keys import KeyFileError

    # Every file the node writes (its stores' -wal and -shm, the pid and ready files) is
    # for this user alone from the moment it exists, whatever umask the shell had.
    os.umask(0o077)
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
    from zmesh.mqtt.tls import ListenerError

    try:
        eventloop.run(run(config, args["ready_file"]))
    except ListenerError as exc:
        if exc.key == "mqtt.listen" and exc.errno:
            default = _is_default("mqtt.listen", "listen", args)
            print(f"Error: {bind_problem('mqtt.listen', '--mqtt', exc.address, exc.errno, default)}", file=sys.stderr)
        else:
            print(f"Error: {exc}", file=sys.stderr)
        return 1
    except (CertError, KeyFileError, StoreError, SessionStoreError, ValueError, OSError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except zmq.ZMQError as exc:
        default = _is_default("mesh.listen", "listen", args, section="mesh")
        print(f"Error: {bind_problem('mesh.listen', '--listen', config.mesh.listen, exc.errno, default)}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


def bind_problem(key: str, flag: str, address: str, err: int | None, default: bool) -> str:
    """What to tell the user when ``address`` (config ``key``, flag ``flag``) cannot be bound."""
    host = address.rpartition(":")[0].strip("[]") or address
    which = f"the default {key}" if default else key
    if err == errno.EADDRNOTAVAIL:
        return (f"{which} {address} ({flag}): {host} is not an address of this host; "
                "listen on one of its own addresses (or 0.0.0.0), and set mesh.advertise_host "
                "if peers reach it by another")
    if err == errno.EADDRINUSE:
        holder = "a node, or an MQTT broker such as Mosquitto" if key.startswith("mqtt") else "a node"
        return (f"{which} {address} ({flag}): the port is in use by another process ({holder} "
                f"already running?); choose another with {flag} HOST:PORT (zmesh doctor checks every port)")
    reason = os.strerror(err) if err else "cannot bind"
    return f"{which} {address} ({flag}): {reason}"


def _is_default(key: str, name: str, args: dict[str, Any], section: str = "mqtt") -> bool:
    """Whether ``key`` came from neither a flag nor the config file (so the default)."""
    if key in args["overrides"]:
        return False
    if not args["config"]:
        return True
    import tomllib

    try:
        with open(args["config"], "rb") as f:
            return name not in tomllib.load(f).get(section, {})
    except (OSError, ValueError):
        return False


if __name__ == "__main__":
    sys.exit(main())
