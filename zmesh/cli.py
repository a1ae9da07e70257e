"""The `zmesh` command. Flags follow mosquitto_pub/mosquitto_sub: `-h` is the host, help is
`--help`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from zmesh import __version__, eventloop
from zmesh.cli_auth import register as _register_auth_commands

CONTEXT = {"help_option_names": ["--help"]}
# Typer's pretty tracebacks print local variables, which may hold key material: never.
app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  help="zmesh: a brokerless MQTT mesh over CURVE-secured ZeroMQ.")
node_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="Run a node.")
certs_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="CURVE certificates.")
app.add_typer(node_app, name="node")
keys_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="Keys for encryption at rest.")
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")
jobs_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="Work queues.")
app.add_typer(jobs_app, name="jobs")

EXIT_TIMEOUT = 27  # what mosquitto_sub -W returns

Host = Annotated[str, typer.Option("-h", "--host", help="Node (MQTT) host to talk to.")]
Port = Annotated[int, typer.Option("-p", "--port", help="MQTT port.")]
ClientId = Annotated[str, typer.Option("-i", "--id", help="Client id (default: generated).")]
User = Annotated[str | None, typer.Option("-u", "--username")]
Password = Annotated[str | None, typer.Option("-P", "--pw")]
Version = Annotated[str, typer.Option("-V", "--protocol-version", help="mqttv311 or mqttv5.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


def _level(version: str) -> int:
    from zmesh.mqtt import codec

    levels = {"mqttv311": codec.MQTT_311, "311": codec.MQTT_311, "mqttv5": codec.MQTT_5, "5": codec.MQTT_5}
    if version not in levels:
        raise fail(f"unknown protocol version {version!r} (mqttv311 or mqttv5)")
    return levels[version]


@app.command()
def version() -> None:
    """Print the zmesh version."""
    typer.echo(__version__)


# ---------------------------------------------------------------------------- node


# The node's settings as flags: `node run` and `doctor` take the same ones.
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file.")]
NameOpt = Annotated[str | None, typer.Option("--name")]
CertOpt = Annotated[Path | None, typer.Option("--cert", help="This node's NAME.key_secret.")]
TrustedOpt = Annotated[Path | None, typer.Option("--trusted", help="Directory of trusted *.key files.")]
MqttOpt = Annotated[str | None, typer.Option("--mqtt", help="MQTT listen HOST:PORT ('' disables).")]
ListenOpt = Annotated[str | None, typer.Option("--listen", help="Mesh control HOST:PORT.")]
PeerOpt = Annotated[list[str] | None, typer.Option("--peer", help="Seed peer HOST:PORT (repeatable).")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir")]
DiscoveryOpt = Annotated[list[str] | None, typer.Option("--discovery", help="static, mdns or dns (repeatable).")]
InterfaceOpt = Annotated[str | None, typer.Option("--interface", help="mDNS interface.")]
DnsNameOpt = Annotated[str | None, typer.Option("--dns-name", help="Headless Service name to resolve for peers.")]
LogLevelOpt = Annotated[str | None, typer.Option("--log-level")]


def _overrides(flags: dict[str, Any]) -> dict[str, Any]:
    """The flags that were given, as config overrides (dotted key -> str or list of str)."""
    keys = {
        "name": "node.name", "cert": "mesh.cert", "trusted": "mesh.trusted", "mqtt": "mqtt.listen",
        "listen": "mesh.listen", "data_dir": "node.data_dir", "log_level": "log.level",
        "interface": "discovery.interface", "dns_name": "discovery.dns_name",
        "peer": "mesh.peers", "discovery": "discovery.mode",
    }
    overrides: dict[str, Any] = {}
    for flag, value in flags.items():
        if value is not None and value != []:
            overrides[keys[flag]] = list(value) if isinstance(value, list) else str(value)
    return overrides


def _node_config(config: Path | None, flags: dict[str, Any]) -> Any:
    """Load the config file (if any) with the flags that were given laid over it."""
    from zmesh.config import ConfigError, load_config

    try:
        return load_config(config, _overrides(flags))
    except ConfigError as exc:
        raise fail(str(exc), 2) from None


@node_app.command("run")
def node_run(
    config: ConfigOpt = None,
    name: NameOpt = None,
    cert: CertOpt = None,
    trusted: TrustedOpt = None,
    mqtt: MqttOpt = None,
    listen: ListenOpt = None,
    peer: PeerOpt = None,
    data_dir: DataDirOpt = None,
    discovery: DiscoveryOpt = None,
    interface: InterfaceOpt = None,
    dns_name: DnsNameOpt = None,
    log_level: LogLevelOpt = None,
    ready_file: Annotated[str | None, typer.Option("--ready-file", hidden=True)] = None,
) -> None:
    """Run a node until SIGINT/SIGTERM; flags override the config file."""
    from zmesh import daemon

    flags = dict(locals())
    for local in ("config", "ready_file", "daemon"):
        flags.pop(local, None)
    _node_config(config, flags)  # a bad config is reported here, like any other CLI error
    daemon.exec_node(config, _overrides(flags), ready_file)


@app.command()
def doctor(
    config: ConfigOpt = None,
    name: NameOpt = None,
    cert: CertOpt = None,
    trusted: TrustedOpt = None,
    mqtt: MqttOpt = None,
    listen: ListenOpt = None,
    peer: PeerOpt = None,
    discovery: DiscoveryOpt = None,
    interface: InterfaceOpt = None,
    dns_name: DnsNameOpt = None,
) -> None:
    """Check what a node needs (ports, certificates, multicast, DNS, seeds) without running it."""
    from zmesh.doctor import Check, run_checks

    flags = dict(locals())
    flags.pop("config")
    flags.pop("Check", None)
    flags.pop("run_checks", None)
    flags["name"] = flags["name"] or "doctor"
    node_config = _node_config(config, flags)

    def report(check: Check) -> None:
        line = f"{'ok  ' if check.ok else 'FAIL'}  {check.what}"
        typer.echo(line + (f"\n      -> {check.advice}" if not check.ok and check.advice else ""))

    if not eventloop.run(run_checks(node_config, report)):
        raise typer.Exit(1)


# ---------------------------------------------------------------------------- certs


@certs_app.command("create")
def certs_create(
    name: str,
    directory: Annotated[Path, typer.Option("--dir", "-d")] = Path("certs"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing certificate.")] = False,
) -> None:
    """Create NAME.key (public) and NAME.key_secret (0600) for a node or client."""
    from zmesh.certs import CertError, create_certificate

    try:
        public, secret = create_certificate(directory, name, force=force)
    except CertError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"created {public} and {secret} (secret: mode 0600; share only the .key file)")


@certs_app.command("list")
def certs_list(directory: Annotated[Path, typer.Option("--dir", "-d")] = Path("certs")) -> None:
    """List certificates: name, public key, whether the secret is here."""
    from zmesh.certs import CertError, list_certificates

    try:
        found = list_certificates(directory)
    except CertError as exc:
        raise fail(str(exc)) from None
    for cert_name, key, has_secret in found:
        typer.echo(f"{cert_name:20} {key.decode()}  {'secret' if has_secret else 'public only'}")


@keys_app.command("create")
def keys_create(
    path: Path,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file.")] = False,
) -> None:
    """Create an AES-256 key file (mode 0600) for store.key_file."""
    from zmesh.keys import KeyFileError, create_key_file

    try:
        create_key_file(path, force=force)
    except KeyFileError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"created {path} (mode 0600); set [store] key_file = \"{path}\"")


# ---------------------------------------------------------------------------- pub / sub


@app.command()
def pub(
    topic: Annotated[str, typer.Option("-t", "--topic")],
    message: Annotated[str | None, typer.Option("-m", "--message")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", help="Send a file as the message.")] = None,
    stdin_message: Annotated[bool, typer.Option("-s", "--stdin-file", help="Read the message from stdin.")] = False,
    null_message: Annotated[bool, typer.Option("-n", "--null-message", help="Send an empty message.")] = False,
    qos: Annotated[int, typer.Option("-q", "--qos", min=0, max=2)] = 0,
    retain: Annotated[bool, typer.Option("-r", "--retain")] = False,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    client_id: ClientId = "",
    username: User = None,
    password: Password = None,
    protocol_version: Version = "mqttv311",
) -> None:
    """Publish one message, like mosquitto_pub."""
    if sum(x is not None and x is not False for x in (message, file, stdin_message or None, null_message or None)) != 1:
        raise fail("give exactly one of -m, -f, -s, -n")
    if file is not None:
        payload = file.read_bytes()
    elif stdin_message:
        payload = sys.stdin.buffer.read()
    else:
        payload = (message or "").encode()

    async def go() -> None:
        from zmesh.mqtt.client import Client

        client = Client(client_id, _level(protocol_version))
        await client.connect(host, port, username, password)
        try:
            await client.publish(topic, payload, qos, retain)
        finally:
            await client.disconnect()

    _run_client(go())


@app.command()
def sub(
    topic: Annotated[list[str], typer.Option("-t", "--topic", help="Filter (repeatable).")],
    qos: Annotated[int, typer.Option("-q", "--qos", min=0, max=2)] = 0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Print 'topic payload'.")] = False,
    count: Annotated[int, typer.Option("-C", help="Exit after this many messages.")] = 0,
    timeout: Annotated[float, typer.Option("-W", help="Exit (code 27) after this many seconds.")] = 0,
    retained_only: Annotated[bool, typer.Option("--retained-only", help="Only print retained messages.")] = False,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    client_id: ClientId = "",
    username: User = None,
    password: Password = None,
    protocol_version: Version = "mqttv311",
) -> None:
    """Subscribe and print messages, like mosquitto_sub."""

    async def go() -> None:
        from zmesh.mqtt.client import Client

        client = Client(client_id, _level(protocol_version))
        await client.connect(host, port, username, password)
        try:
            codes = await client.subscribe([(t, qos) for t in topic])
            for filt, code in zip(topic, codes, strict=True):
                if code >= 0x80:
                    typer.echo(f"Error: subscription to {filt} refused (code {code:#x})", err=True)
            seen = 0
            out = sys.stdout.buffer
            async for msg in client.messages():
                if retained_only and not msg.retain:
                    break
                out.write(msg.topic.encode() + b" " + msg.payload + b"\n" if verbose else msg.payload + b"\n")
                out.flush()
                seen += 1
                if count and seen >= count:
                    break
        finally:
            await client.disconnect()

    _run_client(go(), timeout)


def _run_client(coro: Any, timeout: float = 0) -> None:
    from zmesh.mqtt.client import ClientError

    async def bounded() -> None:
        if timeout:
            await asyncio.wait_for(coro, timeout)
        else:
            await coro

    try:
        eventloop.run(bounded())
    except TimeoutError:
        raise typer.Exit(EXIT_TIMEOUT) from None
    except (ClientError, OSError) as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- jobs


@jobs_app.command("submit")
def jobs_submit(
    queue: str,
    message: Annotated[str | None, typer.Option("-m", "--message")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option("-W", help="With --wait: give up (exit 27) after this many seconds.")] = 0,
    job_id: Annotated[str | None, typer.Option("--id", help="Job id (idempotency key); default: random.")] = None,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
) -> None:
    """Submit a job; prints its id (with --wait: its result; exit 1 if it failed)."""
    import uuid

    payload = file.read_bytes() if file is not None else (message or "").encode()
    job = job_id or uuid.uuid4().hex
    failed: list[str] = []

    async def go() -> None:
        from zmesh.mqtt.client import Client

        client = Client()
        await client.connect(host, port, username, password)
        try:
            if wait:
                await client.subscribe([(f"$jobs/result/{job}", 1), (f"$jobs/failed/{job}", 1)])
            await client.publish(f"$jobs/submit/{queue}/{job}", payload, qos=1)  # PUBACK: accepted
            if not wait:
                typer.echo(job)
                return
            async for msg in client.messages():
                if msg.topic.startswith("$jobs/failed/"):
                    failed.append(msg.payload.decode(errors="replace"))
                else:
                    sys.stdout.buffer.write(msg.payload + (b"" if msg.payload.endswith(b"\n") else b"\n"))
                    sys.stdout.flush()
                return
        finally:
            await client.disconnect()

    _run_client(go(), timeout if wait else 0)
    if failed:
        raise fail(failed[0])


@jobs_app.command("work", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def jobs_work(
    ctx: typer.Context,
    queue: str,
    count: Annotated[int, typer.Option("-C", help="Exit after this many jobs.")] = 0,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
) -> None:
    """Run COMMAND for each job of QUEUE: `zmesh jobs work QUEUE -- COMMAND ARGS`.

    The payload is on stdin and the job id in $ZMESH_JOB_ID; exit 0 acknowledges with stdout
    as the result, any other exit fails the job (it is retried elsewhere while attempts remain).
    While COMMAND runs, the job's lease is extended every third of it, however long it takes."""
    import os

    command = list(ctx.args)
    if not command:
        raise fail("give the command after --, e.g. zmesh jobs work scan -- ./scan.sh")

    async def keep_leased(client: Any, job_id: str, lease: float) -> None:
        # Empty payload: one more lease from now. Every third of it, so one late or lost
        # extension still leaves time for the next.
        while True:
            await asyncio.sleep(max(lease / 3, 0.05))
            await client.publish(f"$jobs/extend/{job_id}", b"", qos=0)

    async def go() -> None:
        from zmesh.jobbridge import lease_of
        from zmesh.mqtt.client import Client
        from zmesh.mqtt.codec import MQTT_5

        client = Client(level=MQTT_5)  # MQTT 5: each job comes with its lease (a user property)
        await client.connect(host, port, username, password)
        done = 0
        try:
            await client.subscribe([(f"$jobs/queue/{queue}/+", 1)])
            async for msg in client.messages():
                job_id = msg.topic.rsplit("/", 1)[1]
                process = await asyncio.create_subprocess_exec(
                    *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE, env={**os.environ, "ZMESH_JOB_ID": job_id},
                )
                keeper = asyncio.create_task(keep_leased(client, job_id, lease_of(msg.properties)))
                try:
                    out, err = await process.communicate(msg.payload)
                finally:
                    keeper.cancel()
                if process.returncode == 0:
                    await client.publish(f"$jobs/done/{job_id}", out, qos=1)
                else:
                    reason = f"exit {process.returncode}: {err.decode(errors='replace').strip()[-500:]}"
                    await client.publish(f"$jobs/fail/{job_id}", reason.encode(), qos=1)
                typer.echo(f"job {job_id}: {'done' if process.returncode == 0 else 'failed'}", err=True)
                done += 1
                if count and done >= count:
                    return
        finally:
            await client.disconnect()

    _run_client(go())


@jobs_app.command("stats")
def jobs_stats(
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Per queue (and shared subscription group) on this node: worker nodes serving it, depth,
    in flight, oldest job age, done, redeliveries, dead letters."""

    def render(found: dict[str, Any]) -> str:
        lines = [f"{'QUEUE':20} {'WORKERS':>7} {'DEPTH':>7} {'IN FLIGHT':>9} {'OLDEST':>8} {'DONE':>8} "
                 f"{'REDELIVERED':>11} {'DEAD':>6}"]
        for name, s in found.items():
            lines.append(f"{name:20} {s.get('workers', 0):>7} {s['depth']:>7} {s['in_flight']:>9} "
                         f"{s['oldest_age']:>7.1f}s {s['done_total']:>8} {s['redeliveries_total']:>11} "
                         f"{s['dead_total']:>6}")
        return "\n".join(lines)

    _show_sys("$SYS/zmesh/jobs", host, port, username, password, as_json, render)


# ---------------------------------------------------------------------------- introspection


def _fetch_sys(topic: str, host: str, port: int, username: str | None, password: str | None) -> Any:
    async def go() -> Any:
        from zmesh.mqtt.client import Client

        client = Client()
        await client.connect(host, port, username, password)
        try:
            await client.subscribe([(topic, 0)])
            async for msg in client.messages():
                return json.loads(msg.payload)
        finally:
            await client.disconnect()

    result: list[Any] = []

    async def keep() -> None:
        result.append(await go())

    _run_client(keep(), 10)
    return result[0]


def _show_sys(
    topic: str, host: str, port: int, username: str | None, password: str | None,
    as_json: bool, render: Any,
) -> None:
    """Print a node's $SYS value as JSON or through ``render``."""
    found = _fetch_sys(topic, host, port, username, password)
    typer.echo(json.dumps(found, indent=2) if as_json else render(found))


@app.command()
def peers(
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Ask a running node which peers it sees, and in what state."""

    def render(found: list[dict[str, Any]]) -> str:
        lines = [f"{'NAME':16} {'STATE':11} {'ADDRESS':22} {'FOR':>8} {'SEEN':>7}  KEY"]
        for p in found:
            seen = "-" if p["last_seen_s"] is None else f"{p['last_seen_s']}s"
            lines.append(f"{p['name'] or '?':16} {p['state']:11} {p['address']:22} {p['for_s']:>7}s {seen:>7}  {p['key']}")
        return "\n".join(lines)

    _show_sys("$SYS/zmesh/peers", host, port, username, password, as_json, render)


@app.command("topics")
def topics_cmd(
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the retained topic tree of a running node."""
    from zmesh.topictree import render_tree

    _show_sys("$SYS/zmesh/topics", host, port, username, password, as_json, render_tree)


@app.command()
def demo(
    duration: Annotated[float, typer.Option(help="Stop after this many seconds (0: until Ctrl-C).")] = 0,
) -> None:
    """Start a local mesh of three nodes and show messages flowing between them."""
    from zmesh.demo import run_demo

    try:
        code = eventloop.run(run_demo(duration))
    except KeyboardInterrupt:
        code = 0
    raise typer.Exit(code)


@app.command(context_settings={**CONTEXT, "allow_extra_args": True, "ignore_unknown_options": True})
def bench(
    ctx: typer.Context,
    scenario: Annotated[str, typer.Argument(help="pubsub, mqtt_e2e, fanout, idle, reqrep, scaling, retained, discovery or all.")],
    quick: Annotated[bool, typer.Option("--quick", help="Short runs (the whole suite in under 5 minutes).")] = False,
) -> None:
    """Run a benchmark scenario from benchmarks/ (extra options go to it; see benchmarks/README.md)."""
    from zmesh.bench import run

    try:
        code = run(scenario, (["--quick"] if quick else []) + list(ctx.args))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise fail(str(exc), 2) from None
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- users and ACLs

# `passwd`, `acl check`, `node reload` (zmesh.cli_auth)
_register_auth_commands(app, node_app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
