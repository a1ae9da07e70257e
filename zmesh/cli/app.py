"""The `zmesh` command. Flags follow mosquitto_pub/mosquitto_sub: `-h` is the host, help is
`--help`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

# Plain click help, not typer's rich panels: those print every option's Python type
# (`<bool>`, `<str>`, `<list[str]>`) as noise, and importing rich costs start-up time.
# Read by typer when it is imported, so before the import.
os.environ.setdefault("TYPER_USE_RICH", "0")

import typer  # noqa: E402
import typer.core  # noqa: E402

from zmesh import __version__, eventloop  # noqa: E402
from zmesh.cli.auth import register as _register_auth_commands  # noqa: E402
from zmesh.cli.authority import register as _register_authority_commands  # noqa: E402


def _plain_value_name(self: Any, ctx: Any) -> str | None:
    """What an option's value is called in --help: its metavar, else its name in capitals
    (click's way), never typer's Python type (`<str>`, `<list[str]>`). Arguments: their
    name alone."""
    if isinstance(self, typer.core.TyperArgument):
        return None
    return self.metavar if self.metavar is not None else (self.name or "value").upper()


typer.core.TyperOption.display_type_rich = _plain_value_name  # type: ignore[method-assign]
typer.core.TyperArgument.display_type_rich = _plain_value_name  # type: ignore[method-assign]

CONTEXT = {"help_option_names": ["--help"]}
# Typer's pretty tracebacks print local variables, which may hold key material: never.
app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False, pretty_exceptions_show_locals=False,
                  help="zmesh: a brokerless MQTT mesh over CURVE-secured ZeroMQ.")
node_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True,
                       help="Node commands (a group): `zmesh node run` runs one, `zmesh node reload` makes a running one re-read its files.")
certs_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="CURVE certificates.")
app.add_typer(node_app, name="node")
keys_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="Keys for encryption at rest.")
app.add_typer(certs_app, name="certs")
app.add_typer(keys_app, name="keys")
jobs_app = typer.Typer(context_settings=CONTEXT, no_args_is_help=True, help="Work queues.")
app.add_typer(jobs_app, name="jobs")

EXIT_TIMEOUT = 27  # what mosquitto_sub -W returns

Host = Annotated[str, typer.Option("-h", "--host", metavar="HOST", help="Node (MQTT) host to talk to.")]
Port = Annotated[int, typer.Option("-p", "--port", metavar="PORT", help="The node's MQTT port (mqtt.listen).")]
ClientId = Annotated[str, typer.Option("-i", "--id", metavar="ID", help="Client id (default: generated).")]
User = Annotated[str | None, typer.Option("-u", "--username", metavar="USER", help="MQTT username.")]
Password = Annotated[str | None, typer.Option("-P", "--pw", metavar="PASSWORD", help="MQTT password.")]


def fail(message: str, code: int = 1) -> typer.Exit:
    typer.echo(f"Error: {message}", err=True)
    return typer.Exit(code)


@app.command()
def version() -> None:
    """Print the zmesh version (also: zmesh --version)."""
    typer.echo(f"zmesh {__version__}")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"zmesh {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", help="Print the zmesh version and exit.",
                                               callback=_print_version, is_eager=True)] = False,
) -> None:
    """zmesh: a brokerless MQTT mesh over CURVE-secured ZeroMQ."""


# ---------------------------------------------------------------------------- node


# The node's settings as flags: `node run` and `doctor` take the same ones.
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", metavar="FILE", help="TOML config file.")]
NameOpt = Annotated[str | None, typer.Option("--name", metavar="NAME", help="This node's name, shown to peers (node.name).")]
CertOpt = Annotated[Path | None, typer.Option("--cert", metavar="FILE", help="This node's NAME.key_secret (mesh.cert).")]
TrustedOpt = Annotated[Path | None, typer.Option("--trusted", metavar="DIR", help="Directory of trusted *.key files (mesh.trusted; default: that of --cert).")]
MqttOpt = Annotated[str | None, typer.Option("--mqtt", metavar="HOST:PORT", help="MQTT listener (mqtt.listen, default 127.0.0.1:1883; '' disables).")]
ListenOpt = Annotated[str | None, typer.Option("--listen", metavar="HOST:PORT", help="Mesh control socket (mesh.listen, default 127.0.0.1:7100).")]
PeerOpt = Annotated[list[str] | None, typer.Option("--peer", metavar="[KEY@]HOST:PORT", help="Seed peer (mesh.peers; repeatable); with its public KEY it is dialled once, not once per trusted key.")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", metavar="DIR", help="State directory: retained store, job spool, pid file (node.data_dir).")]
DiscoveryOpt = Annotated[list[str] | None, typer.Option("--discovery", metavar="MODE", help="static, mdns or dns (discovery.mode; repeatable).")]
InterfaceOpt = Annotated[str | None, typer.Option("--interface", metavar="IFACE", help="The one interface mDNS uses (discovery.interface).")]
DnsNameOpt = Annotated[str | None, typer.Option("--dns-name", metavar="NAME", help="Headless Service name to resolve for peers (discovery.dns_name).")]
LogLevelOpt = Annotated[str | None, typer.Option("--log-level", metavar="LEVEL", help="debug, info, warning or error (log.level).")]


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
    ready_file: Annotated[str | None, typer.Option("--ready-file", metavar="FILE", help="Once serving, write the bound ports here as JSON (control_port, mqtt_port, mqtt_listeners): for scripts and supervisors.")] = None,
) -> None:
    """Run a node until SIGINT/SIGTERM; flags override the config file."""
    from zmesh.cli import daemon

    flags = dict(locals())
    for local in ("config", "ready_file", "daemon"):
        flags.pop(local, None)
    node_config = _node_config(config, flags)  # a bad config is reported here, like any other CLI error
    problem = _identity_problem(node_config)
    if problem:
        raise fail(problem, 2)
    daemon.exec_node(config, _overrides(flags), ready_file)


def _identity_problem(node_config: Any) -> str:
    """The mistakes with --cert/--trusted a newcomer makes, named by flag and config key,
    before the node starts (and before any warning about the file's mode)."""
    from zmesh.security.certs import SECRET_SUFFIX

    if node_config.mesh.authority is not None:
        return ""  # certificate mode (mesh.authority): no hand-made key, checked at start
    cert = node_config.mesh.cert
    if cert is None:
        return "no certificate: give --cert NAME.key_secret (mesh.cert); create one with zmesh certs create NAME"
    if cert.suffix == ".key" and not cert.name.endswith(SECRET_SUFFIX):
        return (f"--cert {cert} (mesh.cert): a public key; a node needs its secret certificate, "
                f"use {cert.with_name(cert.stem + SECRET_SUFFIX)}")
    if not cert.is_file():
        return f"--cert {cert} (mesh.cert): no such file (create one with zmesh certs create NAME --dir DIR)"
    trusted = node_config.mesh.trusted or cert.parent
    if not trusted.is_dir():
        which = "--trusted / mesh.trusted" if node_config.mesh.trusted else "the directory of --cert (mesh.trusted's default)"
        return f"{which} {trusted}: no such directory (it holds the trusted NAME.key files)"
    return ""


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
    from zmesh.cli.doctor import Check, run_checks

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
    name: Annotated[str, typer.Argument(help="The certificate's name: NAME.key and NAME.key_secret.")],
    directory: Annotated[Path, typer.Option("--dir", "-d", metavar="DIR", help="Where the files go.")] = Path("certs"),
    force: Annotated[bool, typer.Option("--force", help="Replace an existing certificate.")] = False,
) -> None:
    """Create NAME.key (public) and NAME.key_secret (0600) for a node or client."""
    from zmesh.security.certs import CertError, create_certificate

    try:
        public, secret = create_certificate(directory, name, force=force)
    except CertError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"created {public} and {secret} (secret: mode 0600; share only the .key file)")


@certs_app.command("list")
def certs_list(directory: Annotated[Path, typer.Option("--dir", "-d", metavar="DIR", help="Where to look.")] = Path("certs")) -> None:
    """List certificates: name, public key, whether the secret is here."""
    from zmesh.security.certs import CertError, list_certificates

    try:
        found = list_certificates(directory)
    except CertError as exc:
        raise fail(str(exc)) from None
    for cert_name, key, has_secret in found:
        typer.echo(f"{cert_name:20} {key.decode()}  {'secret' if has_secret else 'public only'}")


@keys_app.command("create")
def keys_create(
    path: Annotated[Path, typer.Argument(help="The key file to create.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key file.")] = False,
) -> None:
    """Create an AES-256 key file (mode 0600) for store.key_file."""
    from zmesh.security.keys import KeyFileError, create_key_file

    try:
        create_key_file(path, force=force)
    except KeyFileError as exc:
        raise fail(str(exc)) from None
    typer.echo(f"created {path} (mode 0600); set [store] key_file = \"{path}\"")


# ---------------------------------------------------------------------------- pub / sub


# `pub`, `sub` and `wait` are parsed by zmesh.cli.clients (argparse, mosquitto's flags), and
# zmesh.cli.main sends them there before typer is even imported. These stubs list them in
# `zmesh --help` and forward to the same code when zmesh.cli.app is entered directly.
_FORWARD = {**CONTEXT, "allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}


def _forward(command: str, args: list[str]) -> None:
    from zmesh.cli.clients import main as run

    raise typer.Exit(run(command, args))


@app.command(context_settings=_FORWARD, add_help_option=False)
def pub(ctx: typer.Context) -> None:
    """Publish a message, like mosquitto_pub (zmesh pub --help for the flags)."""
    _forward("pub", ctx.args)


@app.command(context_settings=_FORWARD, add_help_option=False)
def sub(ctx: typer.Context) -> None:
    """Subscribe and print messages, like mosquitto_sub (zmesh sub --help for the flags)."""
    _forward("sub", ctx.args)


@app.command(context_settings=_FORWARD, add_help_option=False)
def wait(ctx: typer.Context) -> None:
    """Wait until a node answers (--peers N: and sees N peers up); for scripts (zmesh wait --help)."""
    _forward("wait", ctx.args)


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
    except ClientError as exc:  # names host:port and the cause; the code is mosquitto's
        raise fail(str(exc), exc.code) from None
    except OSError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        pass


# ---------------------------------------------------------------------------- jobs


@jobs_app.command("submit")
def jobs_submit(
    queue: Annotated[str, typer.Argument(help="The queue's name.")],
    message: Annotated[str | None, typer.Option("-m", "--message", metavar="PAYLOAD", help="The job's payload.")] = None,
    file: Annotated[Path | None, typer.Option("-f", "--file", metavar="FILE", help="The job's payload from a file.")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="Wait for the result and print it.")] = False,
    timeout: Annotated[float, typer.Option("-W", metavar="SECONDS", help="With --wait: give up (exit 27) after this many seconds.")] = 0,
    job_id: Annotated[str | None, typer.Option("--id", metavar="ID", help="Job id (idempotency key); default: random.")] = None,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
) -> None:
    """Submit a job; prints its id (with --wait: its result; exit 1 if it failed). Without
    --wait, `zmesh jobs result ID` fetches the result later (kept 10 minutes)."""
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


@jobs_app.command("result")
def jobs_result(
    job_id: Annotated[str, typer.Argument(help="The id `zmesh jobs submit` printed.")],
    timeout: Annotated[float, typer.Option("-W", metavar="SECONDS", help="Give up (exit 27) after this many seconds.")] = 10,
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
) -> None:
    """Print the result of a job submitted on this node (exit 1 if it failed; 27 if none came
    within -W: still running, or finished more than 10 minutes ago)."""
    failed: list[str] = []
    got: list[bool] = []

    async def go() -> None:
        from zmesh.mqtt.client import Client

        client = Client()
        await client.connect(host, port, username, password)
        try:
            await client.subscribe([(f"$jobs/result/{job_id}", 1), (f"$jobs/failed/{job_id}", 1)])
            async for msg in client.messages():
                got.append(True)
                if msg.topic.startswith("$jobs/failed/"):
                    failed.append(msg.payload.decode(errors="replace"))
                else:
                    sys.stdout.buffer.write(msg.payload + (b"" if msg.payload.endswith(b"\n") else b"\n"))
                    sys.stdout.flush()
                return
        finally:
            await client.disconnect()

    try:
        _run_client(go(), timeout)
    except typer.Exit as stop:
        if stop.exit_code == EXIT_TIMEOUT and not got:
            typer.echo(f"Error: no result for job {job_id} within {timeout:g} s: still running, finished more "
                       "than 10 minutes ago, or submitted on another node", err=True)
        raise
    if failed:
        raise fail(failed[0])


@jobs_app.command("work", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def jobs_work(
    ctx: typer.Context,
    queue: Annotated[str, typer.Argument(help="The queue's name.")],
    count: Annotated[int, typer.Option("-C", metavar="COUNT", help="Exit after this many jobs.")] = 0,
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
        from zmesh.mqtt.client import ClientError

        # Empty payload: one more lease from now. Every third of it, so one late or lost
        # extension still leaves time for the next. A lost connection ends it quietly: the
        # reconnect below carries on.
        with contextlib.suppress(ClientError):
            while True:
                await asyncio.sleep(max(lease / 3, 0.05))
                await client.publish(f"$jobs/extend/{job_id}", b"", qos=0)

    async def go() -> None:
        from zmesh.cli.clients import reconnect_delay
        from zmesh.jobs.bridge import lease_of
        from zmesh.mqtt.client import Client, ClientError
        from zmesh.mqtt.codec import MQTT_5

        async def connect() -> Client:
            client = Client(level=MQTT_5)  # MQTT 5: each job comes with its lease (a user property)
            await client.connect(host, port, username, password)
            return client

        client = await connect()  # the first connection's failure is final (a wrong port)
        done = 0
        # An answer whose PUBACK was lost with the connection: sent again after reconnecting
        # (the submitter holds the job until it hears; a duplicate answer is ignored).
        unsent: tuple[str, bytes] | None = None
        try:
            while True:
                try:
                    await client.subscribe([(f"$jobs/queue/{queue}/+", 1)])
                    if unsent is not None:
                        await client.publish(*unsent, qos=1)
                        unsent = None
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
                            unsent = (f"$jobs/done/{job_id}", out)
                        else:
                            reason = f"exit {process.returncode}: {err.decode(errors='replace').strip()[-500:]}"
                            unsent = (f"$jobs/fail/{job_id}", reason.encode())
                        await client.publish(*unsent, qos=1)
                        unsent = None
                        typer.echo(f"job {job_id}: {'done' if process.returncode == 0 else 'failed'}", err=True)
                        done += 1
                        if count and done >= count:
                            return
                except ClientError as exc:
                    lost = str(exc)
                await client.disconnect()
                # The node restarted (a sidecar's restart, say): come back with backoff and
                # subscribe again, instead of leaving the queue without this worker.
                typer.echo(f"zmesh: connection lost ({lost}); reconnecting", err=True)
                attempt = 0
                while True:
                    await asyncio.sleep(reconnect_delay(attempt))
                    try:
                        client = await connect()
                        break
                    except ClientError as exc:
                        if exc.code != 1:
                            raise  # refused by CONNACK (credentials?): waiting will not help
                        attempt += 1
                typer.echo(f"zmesh: reconnected to {client.server}", err=True)
        finally:
            await client.disconnect()

    _run_client(go())


@jobs_app.command("stats")
def jobs_stats(
    host: Host = "127.0.0.1",
    port: Port = 1883,
    username: User = None,
    password: Password = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON value.")] = False,
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


# A node answers a $SYS/zmesh/... subscription at once with the current value; none within
# this time after the SUBACK means the ACL hides it (every SUBSCRIBE is granted, and each
# message is checked for read on delivery), which waiting longer would not change.
SYS_WAIT = 3.0


def _fetch_sys(topic: str, host: str, port: int, username: str | None, password: str | None) -> Any:
    async def go() -> Any:
        from zmesh.mqtt.client import Client, ClientError

        client = Client()
        await client.connect(host, port, username, password)
        try:
            await client.subscribe([(topic, 0)])
            messages = client.messages()
            try:
                msg = await asyncio.wait_for(anext(messages), SYS_WAIT)
            except TimeoutError:
                who = f"user {username!r}" if username else "anonymous clients"
                raise ClientError(
                    f"{client.server} sent no {topic} within {SYS_WAIT:g} s of subscribing: its ACL "
                    f"(mqtt.acl_file) hides $SYS from {who}; allow it with `topic read $SYS/zmesh/#`"
                ) from None
            return json.loads(msg.payload)
        finally:
            await client.disconnect()

    result: list[Any] = []

    async def keep() -> None:
        result.append(await go())

    _run_client(keep(), 15)
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON value.")] = False,
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
    as_json: Annotated[bool, typer.Option("--json", help="Print the raw JSON value.")] = False,
) -> None:
    """Print the retained topic tree of a running node."""
    from zmesh.retained.topictree import render_tree

    _show_sys("$SYS/zmesh/topics", host, port, username, password, as_json, render_tree)


@app.command()
def demo(
    duration: Annotated[float, typer.Option(metavar="SECONDS", help="Stop after this many seconds (0: until Ctrl-C).")] = 0,
) -> None:
    """Start a local mesh of three nodes and show messages flowing between them."""
    from zmesh.cli.demo import run_demo

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
    from zmesh.cli.bench import run

    try:
        code = run(scenario, (["--quick"] if quick else []) + list(ctx.args))
    except (ValueError, FileNotFoundError, ModuleNotFoundError) as exc:
        raise fail(str(exc), 2) from None
    raise typer.Exit(code)


# ---------------------------------------------------------------------------- users and ACLs

# `passwd`, `acl check`, `node reload` (zmesh.cli.auth)
_register_auth_commands(app, node_app)
_register_authority_commands(app)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
