"""`zmesh pub`, `zmesh sub` and `zmesh wait`: mosquitto_pub/mosquitto_sub's flags, messages
and exit codes (0 ok, 1 an error, the CONNACK code for a refused connection, 27 for -W).

Parsed with argparse, not typer: an alert sent one shell command at a time pays start-up as
its latency, and typer with pydantic and rich costs ~150 ms to import; this module imports
only asyncio, the codec and the client (TLS and WebSocket support only when asked for).
See benchmarks/startup.py for the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import ssl

    from zmesh.mqtt.client import Client

EXIT_ERROR = 1
EXIT_TIMEOUT = 27  # what mosquitto_sub -W returns
LEVELS = {"mqttv31": 3, "31": 3, "mqttv311": 4, "311": 4, "mqttv5": 5, "5": 5}
# Reconnect backoff for `sub`, `jobs work`: first retry soon (a restarting sidecar is back in
# about a second), then doubling, capped so a long outage is noticed within seconds of its end.
BACKOFF_FIRST, BACKOFF_MAX = 0.2, 5.0


def reconnect_delay(attempt: int) -> float:
    """Seconds before reconnect attempt ``attempt`` (0-based) after a lost connection."""
    return min(BACKOFF_FIRST * (2 ** min(attempt, 16)), BACKOFF_MAX)


class UsageError(Exception):
    """A mistake on the command line: printed as mosquitto does, exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse with mosquitto's manners: `-h` is the host, errors are one `Error:` line."""

    def error(self, message: str) -> NoReturn:
        if "-h/--host" in message and "expected one argument" in message:
            message = "-h is the host (-h HOST); use --help for help"
        raise UsageError(message)


# ---------------------------------------------------------------------------- options


def _common(parser: argparse.ArgumentParser, default_qos: bool = True) -> None:
    add = parser.add_argument
    add("--help", action="help", help="Show this help and exit.")
    add("-h", "--host", default=None, metavar="HOST", help="Node (MQTT server) host to connect to (default 127.0.0.1).")
    add("-p", "--port", type=int, default=None, metavar="PORT",
        help="MQTT port (default 1883; 8883 with --cafile/--capath; from -L if given).")
    add("-L", "--url", metavar="URL", help="mqtt(s)://[USER[:PASSWORD]@]HOST[:PORT]/TOPIC, or ws(s)://... for WebSocket.")
    add("-i", "--id", default="", metavar="ID", help="Client id (default: zmesh- and 12 random hex digits).")
    add("-I", "--id-prefix", default="", metavar="PREFIX", help="Client id prefix; the pid is appended.")
    add("-k", "--keepalive", type=int, default=60, metavar="SECONDS", help="Keepalive in seconds (default 60).")
    add("-u", "--username", metavar="USER", help="Username.")
    add("-P", "--pw", metavar="PASSWORD", help="Password.")
    add("-V", "--protocol-version", default="mqttv311", metavar="VERSION",
        help="mqttv31, mqttv311 (default) or mqttv5 (also 31, 311, 5).")
    add("-c", "--disable-clean-session", action="store_true",
        help="Persistent session: the server keeps subscriptions and queues QoS 1/2 while away (needs -i).")
    add("-x", "--session-expiry-interval", type=int, default=None, metavar="SECONDS",
        help="MQTT 5: seconds the session outlives the connection (with -c: default forever).")
    add("-d", "--debug", action="store_true", help="Print the packets sent and received.")
    add("--quiet", action="store_true", help="Print no error messages.")
    add("-D", "--property", nargs="+", action="append", default=[], metavar="ARG",
        help="MQTT 5 property: -D COMMAND NAME VALUE (user-property takes NAME KEY VALUE); "
             "COMMAND is connect, publish, subscribe, will or disconnect.")
    add("--will-topic", metavar="TOPIC", help="Topic of the will (published if we vanish without DISCONNECT).")
    add("--will-payload", default="", metavar="PAYLOAD", help="Payload of the will.")
    add("--will-qos", type=int, default=0, choices=(0, 1, 2), help="QoS of the will.")
    add("--will-retain", action="store_true", help="Retain the will.")
    add("--cafile", metavar="FILE", help="CA certificates (PEM) to verify the server's TLS certificate: turns TLS on.")
    add("--capath", metavar="DIR", help="Directory of CA certificates (c_rehash'ed): turns TLS on.")
    add("--cert", metavar="FILE", help="Client certificate (PEM) for TLS.")
    add("--key", metavar="FILE", help="Private key (PEM) of --cert.")
    add("--insecure", action="store_true", help="Do not check the server certificate's host name.")
    add("--tls-version", choices=("tlsv1.2", "tlsv1.3"), help="Minimum TLS version.")
    add("--tls-use-os-certs", action="store_true", help="TLS, verifying against the system's CAs.")
    add("--ws", action="store_true", help="MQTT over WebSocket (zmesh extension; -L ws://... likewise).")
    add("--ws-path", default="/", metavar="PATH", help="With --ws: the HTTP path (default /).")
    if default_qos:
        add("-q", "--qos", type=int, default=0, choices=(0, 1, 2), help="QoS (default 0).")


@dataclass
class Conn:
    """Where and how to connect, from the common options."""

    host: str
    port: int
    client_id: str
    level: int
    keepalive: int
    username: str | None
    password: str | None
    clean: bool
    connect_props: dict[str, Any] = field(default_factory=dict)
    disconnect_props: dict[str, Any] = field(default_factory=dict)
    publish_props: dict[str, Any] = field(default_factory=dict)
    subscribe_props: dict[str, Any] = field(default_factory=dict)
    will: Any = None
    tls: ssl.SSLContext | None = None
    ws_path: str | None = None
    debug: bool = False
    quiet: bool = False
    url_topic: str | None = None

    def client(self) -> Client:
        from zmesh.mqtt.client import Client

        return Client(self.client_id, self.level, self.keepalive,
                      debug=(lambda line: print(line, flush=True)) if self.debug else None)

    async def connect(self, client: Client, clean: bool | None = None, timeout: float = 10.0) -> Any:
        return await client.connect(
            self.host, self.port, self.username, self.password,
            clean_start=self.clean if clean is None else clean, will=self.will, timeout=timeout,
            properties=self.connect_props, tls=self.tls, websocket_path=self.ws_path)


# MQTT 5 properties by their mosquitto -D names: (codec name, kind, commands it may go in).
_PROPS: dict[str, tuple[str, str, frozenset[str]]] = {
    "payload-format-indicator": ("payload_format_indicator", "int", frozenset({"publish", "will"})),
    "message-expiry-interval": ("message_expiry_interval", "int", frozenset({"publish", "will"})),
    "content-type": ("content_type", "str", frozenset({"publish", "will"})),
    "response-topic": ("response_topic", "str", frozenset({"publish", "will"})),
    "correlation-data": ("correlation_data", "bytes", frozenset({"publish", "will"})),
    "subscription-identifier": ("subscription_identifier", "int", frozenset({"subscribe"})),
    "session-expiry-interval": ("session_expiry_interval", "int", frozenset({"connect", "disconnect"})),
    "authentication-method": ("authentication_method", "str", frozenset({"connect"})),
    "authentication-data": ("authentication_data", "bytes", frozenset({"connect"})),
    "request-problem-information": ("request_problem_information", "int", frozenset({"connect"})),
    "will-delay-interval": ("will_delay_interval", "int", frozenset({"will"})),
    "request-response-information": ("request_response_information", "int", frozenset({"connect"})),
    "receive-maximum": ("receive_maximum", "int", frozenset({"connect"})),
    "topic-alias-maximum": ("topic_alias_maximum", "int", frozenset({"connect"})),
    "maximum-packet-size": ("maximum_packet_size", "int", frozenset({"connect"})),
    "user-property": ("user_property", "pair", frozenset({"connect", "publish", "subscribe", "will", "disconnect"})),
}


def _properties(specs: list[list[str]]) -> dict[str, dict[str, Any]]:
    """-D COMMAND NAME VALUE... -> {command: {codec name: value}}."""
    out: dict[str, dict[str, Any]] = {}
    for spec in specs:
        if len(spec) < 3:
            raise UsageError(f"-D {' '.join(spec)}: give COMMAND NAME VALUE")
        command, name, *values = spec
        entry = _PROPS.get(name)
        if entry is None:
            raise UsageError(f"-D: unknown property {name!r} (known: {', '.join(sorted(_PROPS))})")
        codec_name, kind, commands = entry
        if command not in commands:
            raise UsageError(f"-D: {name} is not allowed in {command} (only: {', '.join(sorted(commands))})")
        props = out.setdefault(command, {})
        if kind == "pair":
            if len(values) != 2:
                raise UsageError("-D COMMAND user-property KEY VALUE: give a key and a value")
            props.setdefault(codec_name, []).append((values[0], values[1]))
            continue
        if len(values) != 1:
            raise UsageError(f"-D {command} {name}: give one value")
        if kind == "int":
            try:
                props[codec_name] = int(values[0])
            except ValueError:
                raise UsageError(f"-D {command} {name}: {values[0]!r} is not a number") from None
        else:
            props[codec_name] = values[0].encode() if kind == "bytes" else values[0]
    return out


def _tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    if not (args.cafile or args.capath or args.tls_use_os_certs or args.cert or args.tls_version):
        return None
    import ssl

    try:
        context = ssl.create_default_context(cafile=args.cafile, capath=args.capath)
        if args.cert or args.key:
            if not (args.cert and args.key):
                raise UsageError("--cert and --key go together")
            context.load_cert_chain(args.cert, args.key)
    except (OSError, ssl.SSLError) as exc:
        which = " ".join(f"--{n} {getattr(args, n)}" for n in ("cafile", "capath", "cert", "key") if getattr(args, n))
        raise UsageError(f"TLS files ({which}): {getattr(exc, 'strerror', None) or exc}") from None
    if args.tls_version == "tlsv1.3":
        context.minimum_version = ssl.TLSVersion.TLSv1_3
    if args.insecure:
        context.check_hostname = False
    return context


def _parse_url(url: str) -> tuple[str, str, int | None, str | None, str | None, str]:
    """-L: (scheme, host, port, username, password, path)."""
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "ws", "wss") or not parts.hostname:
        raise UsageError(f"-L {url}: not mqtt://, mqtts://, ws:// or wss://HOST[:PORT]/TOPIC")
    try:
        port = parts.port
    except ValueError:
        raise UsageError(f"-L {url}: bad port") from None
    return (parts.scheme, parts.hostname, port, unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None, unquote(parts.path))


def connection(args: argparse.Namespace) -> Conn:
    """The common options as a Conn, checked as mosquitto_pub/sub check them."""
    from zmesh.mqtt import codec

    if args.protocol_version not in LEVELS:
        raise UsageError(f"-V {args.protocol_version}: unknown protocol version (mqttv31, mqttv311 or mqttv5)")
    level = LEVELS[args.protocol_version]
    host, port, username, password = args.host, args.port, args.username, args.pw
    ws_path = args.ws_path if args.ws else None
    tls = _tls_context(args)
    url_topic = None
    if args.url:
        scheme, url_host, url_port, url_user, url_pw, path = _parse_url(args.url)
        host = host or url_host
        if scheme in ("mqtts", "wss") and tls is None:
            import ssl

            tls = ssl.create_default_context()
            if args.insecure:
                tls.check_hostname = False
        if scheme in ("ws", "wss"):
            ws_path = "/"
        default_port = {"mqtt": 1883, "mqtts": 8883, "ws": 80, "wss": 443}[scheme]
        port = port or url_port or default_port
        username, password = username or url_user, password or url_pw
        url_topic = path.lstrip("/") or None
    port = port or (8883 if tls is not None else 1883)
    if not 0 < port < 65536:
        raise UsageError(f"-p {port}: not a port (1-65535)")
    props = _properties(args.property)
    if props and level < codec.MQTT_5:
        raise UsageError("-D properties need MQTT 5: add -V mqttv5")
    if args.session_expiry_interval is not None and level < codec.MQTT_5:
        raise UsageError("-x needs MQTT 5: add -V mqttv5")
    # As mosquitto's clients do, a generated id when none is given (MQTT 3.1 needs one).
    client_id = args.id or (f"{args.id_prefix}{os.getpid()}" if args.id_prefix else f"zmesh-{os.urandom(6).hex()}")
    if args.disable_clean_session and not (args.id or args.id_prefix):
        raise UsageError("-c needs a client id: give -i ID (a persistent session is found by its id)")
    connect_props = dict(props.get("connect", {}))
    if level >= codec.MQTT_5 and args.disable_clean_session:
        # mosquitto's meaning of -c under MQTT 5: the session outlives the connection.
        expiry = args.session_expiry_interval
        connect_props["session_expiry_interval"] = 0xFFFFFFFF if expiry is None else expiry
    elif args.session_expiry_interval is not None:
        connect_props["session_expiry_interval"] = args.session_expiry_interval
    will = None
    if args.will_topic:
        _check_topic_name(args.will_topic, "will topic")
        will = codec.Will(args.will_topic, args.will_payload.encode(), args.will_qos, args.will_retain,
                          properties=props.get("will", {}))
    elif args.will_payload or args.will_retain or args.will_qos:
        raise UsageError("--will-payload/--will-qos/--will-retain need --will-topic")
    return Conn(
        host=host or "127.0.0.1", port=port, client_id=client_id, level=level, keepalive=args.keepalive,
        username=username, password=password, clean=not args.disable_clean_session,
        connect_props=connect_props, disconnect_props=props.get("disconnect", {}),
        publish_props=props.get("publish", {}), subscribe_props=props.get("subscribe", {}),
        will=will, tls=tls, ws_path=ws_path, debug=args.debug, quiet=args.quiet, url_topic=url_topic,
    )


def _check_topic_name(topic: str, what: str = "publish topic") -> None:
    from zmesh.topics import TopicError, validate_topic_name

    try:
        validate_topic_name(topic)
    except TopicError as exc:
        hint = ", does it contain '+' or '#'?" if "+" in topic or "#" in topic else f": {exc}"
        raise UsageError(f"Invalid {what} {topic!r}{hint}") from None


def _check_filter(filt: str) -> None:
    from zmesh.topics import TopicError, validate_topic_filter

    try:
        validate_topic_filter(filt)
    except TopicError as exc:
        raise UsageError(f"Invalid subscription topic {filt!r}, are all '+' and '#' wildcards correct? ({exc})") from None


# ---------------------------------------------------------------------------- running


class Fatal(Exception):
    """Stop with this exit code (the message was printed, or there is none)."""

    def __init__(self, code: int) -> None:
        self.code = code


def _say_error(conn: Conn | None, message: str) -> None:
    if conn is None or not conn.quiet:
        print(f"Error: {message}", file=sys.stderr, flush=True)


def _run(coro: Any) -> int:
    from zmesh.mqtt.client import ClientError

    try:
        asyncio.run(coro)
    except BrokenPipeError:
        # `zmesh sub | head -1`: the reader left, as mosquitto_sub's does; no traceback, and
        # none either when the interpreter flushes stdout on its way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Fatal as exc:
        return exc.code
    except ClientError as exc:
        print(f"Error: {exc}", file=sys.stderr, flush=True)
        return exc.code
    except KeyboardInterrupt:
        return 0
    return 0


def main(command: str, argv: list[str]) -> int:
    """Run ``zmesh COMMAND ARGV...``; the exit code."""
    parser = {"pub": pub_parser, "sub": sub_parser, "wait": wait_parser}[command]()
    try:
        args = parser.parse_args(argv)
        run = {"pub": run_pub, "sub": run_sub, "wait": run_wait}[command]
        return run(args)
    except UsageError as exc:
        print(f"Error: {exc}\nUse 'zmesh {command} --help' to see usage.", file=sys.stderr, flush=True)
        return EXIT_ERROR


# ---------------------------------------------------------------------------- pub


def pub_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zmesh pub", add_help=False, description=(
        "Publish a message, like mosquitto_pub: same flags, messages and exit codes "
        "(0 ok, 1 error, the CONNACK code if the connection is refused)."))
    _common(parser)
    add = parser.add_argument
    add("-t", "--topic", metavar="TOPIC", help="Topic to publish to.")
    add("-m", "--message", metavar="MESSAGE", help="The message.")
    add("-f", "--file", metavar="FILE", help="Send the contents of a file as the message.")
    add("-s", "--stdin-file", action="store_true", help="Read the message from stdin (all of it).")
    add("-l", "--stdin-line", action="store_true", help="Each line from stdin is a message (blank lines are not sent).")
    add("-n", "--null-message", action="store_true", help="Send an empty message.")
    add("-r", "--retain", action="store_true", help="Retain the message.")
    add("--repeat", type=int, default=1, metavar="COUNT", help="Publish the message this many times.")
    add("--repeat-delay", type=float, default=0.0, metavar="SECONDS", help="Seconds between repeats.")
    return parser


def _pub_payloads(args: argparse.Namespace) -> Iterator[bytes] | None:
    """The payloads of -m/-f/-s/-n (None for -l, read as it arrives)."""
    given = [x for x in ("message", "file", "stdin_file", "stdin_line", "null_message")
             if getattr(args, x) not in (None, False)]
    if len(given) != 1:
        raise UsageError("give exactly one of -m, -f, -s, -l, -n")
    if args.stdin_line:
        return None
    if args.file is not None:
        try:
            with open(args.file, "rb") as f:
                payload = f.read()
        except OSError as exc:
            raise UsageError(f"-f {args.file}: {exc.strerror}") from None
    elif args.stdin_file:
        payload = sys.stdin.buffer.read()
    elif args.null_message:
        payload = b""
    else:
        payload = args.message.encode()
    if args.repeat < 1:
        raise UsageError("--repeat must be at least 1")
    return iter([payload] * args.repeat)


def run_pub(args: argparse.Namespace) -> int:
    conn = connection(args)
    topic = args.topic if args.topic is not None else conn.url_topic
    if topic is None:
        raise UsageError("give a topic with -t (or in -L's path)")
    _check_topic_name(topic)
    payloads = _pub_payloads(args)

    async def go() -> None:
        client = conn.client()
        await conn.connect(client)
        try:
            if payloads is None:  # -l: publish each line as it arrives
                loop = asyncio.get_running_loop()
                while line := await loop.run_in_executor(None, sys.stdin.buffer.readline):
                    line = line.rstrip(b"\n")
                    if line:
                        await client.publish(topic, line, args.qos, args.retain, properties=conn.publish_props)
                return
            for i, payload in enumerate(payloads):
                if i and args.repeat_delay:
                    await asyncio.sleep(args.repeat_delay)
                await client.publish(topic, payload, args.qos, args.retain, properties=conn.publish_props)
        finally:
            await client.disconnect(conn.disconnect_props)

    return _run(go())


# ---------------------------------------------------------------------------- sub


def sub_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zmesh sub", add_help=False, description=(
        "Subscribe and print messages, like mosquitto_sub: same flags, messages and exit codes "
        "(27 when -W expires). Reconnects with backoff, resuming its subscriptions (and with -c "
        "its session), when the node restarts."))
    _common(parser)
    add = parser.add_argument
    add("-t", "--topic", action="append", default=[], metavar="FILTER", help="Filter to subscribe to (repeatable).")
    add("-T", "--filter-out", action="append", default=[], metavar="FILTER", help="Do not print topics matching this filter.")
    add("-v", "--verbose", action="store_true", help="Print 'topic payload'.")
    add("-C", "--count", type=int, default=0, metavar="COUNT", help="Exit after this many messages.")
    add("-W", "--timeout", type=float, default=0, metavar="SECONDS", help="Exit (code 27) after this many seconds.")
    add("-R", "--no-retained", action="store_true", help="Do not print retained (stale) messages.")
    add("--retained-only", action="store_true", help="Print only retained messages; exit at the first live one.")
    add("-N", "--no-eol", action="store_true", help="No newline after each message.")
    add("-F", "--format", metavar="FORMAT", help="Output format: %%t topic, %%p payload, %%q QoS, %%r retain, %%l length, "
                               "%%m message id, %%x/%%X payload as hex, %%U unix time, %%I ISO 8601 time, "
                               "%%j JSON, %%%% a %%; \\n \\t \\\\ escapes.")
    add("-E", "--exit-after-subscribe", action="store_true", help="Exit once the subscriptions are acknowledged.")
    add("--no-reconnect", action="store_true", help="Exit (1) when the connection is lost instead of reconnecting.")
    return parser


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "a": "\a", "e": "\x1b", "0": "\0"}


def format_message(fmt: str, msg: Any, now: float) -> bytes:
    """mosquitto_sub -F's format for one message (the subset in `zmesh sub --help`)."""
    import json

    out = bytearray()
    i = 0
    while i < len(fmt):
        ch = fmt[i]
        nxt = fmt[i + 1] if i + 1 < len(fmt) else ""
        if ch == "%" and nxt:
            i += 2
            if nxt == "t":
                out += msg.topic.encode()
            elif nxt == "p":
                out += msg.payload
            elif nxt == "q":
                out += str(msg.qos).encode()
            elif nxt == "r":
                out += b"1" if msg.retain else b"0"
            elif nxt == "l":
                out += str(len(msg.payload)).encode()
            elif nxt == "m":
                out += str(msg.packet_id or 0).encode()
            elif nxt == "x":
                out += msg.payload.hex().encode()
            elif nxt == "X":
                out += msg.payload.hex().upper().encode()
            elif nxt == "U":
                out += f"{now:.9f}".encode()
            elif nxt == "I":
                out += time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)).encode()
            elif nxt == "j":
                try:
                    payload: Any = json.loads(msg.payload)
                except ValueError:
                    payload = msg.payload.decode(errors="replace")
                # mosquitto_sub's own shape, its timestamp ("...T01:29:52.897975Z+0000") included;
                # "mid" only for QoS > 0, as there.
                local = time.localtime(now)
                tst = (f"{time.strftime('%Y-%m-%dT%H:%M:%S', local)}.{int(now % 1 * 1e6):06d}Z"
                       f"{time.strftime('%z', local)}")
                fields: dict[str, Any] = {"tst": tst, "topic": msg.topic, "qos": msg.qos,
                                          "retain": int(msg.retain), "payloadlen": len(msg.payload)}
                if msg.qos:
                    fields["mid"] = msg.packet_id or 0
                fields["payload"] = payload
                out += json.dumps(fields, separators=(",", ":")).encode()
            elif nxt == "%":
                out += b"%"
            else:
                out += ("%" + nxt).encode()
            continue
        if ch == "\\" and nxt in _ESCAPES:
            out += _ESCAPES[nxt].encode()
            i += 2
            continue
        out += ch.encode()
        i += 1
    return bytes(out)


def run_sub(args: argparse.Namespace) -> int:
    conn = connection(args)
    filters = list(args.topic) or ([conn.url_topic] if conn.url_topic else [])
    if not filters:
        raise UsageError("give at least one -t FILTER")
    for filt in filters + list(args.filter_out):
        _check_filter(filt)
    if args.count < 0 or args.timeout < 0:
        raise UsageError("-C and -W take a positive number")

    from zmesh.topics import matches

    out = sys.stdout.buffer
    seen = 0

    def show(msg: Any) -> bool:
        """Print ``msg``; True when done (-C reached)."""
        nonlocal seen
        if args.no_retained and msg.retain:
            return False
        if any(matches(f, msg.topic) for f in args.filter_out):
            return False
        if args.format:
            line = format_message(args.format, msg, time.time())
        elif args.verbose:
            line = msg.topic.encode() + b" " + msg.payload
        else:
            line = msg.payload
        out.write(line if args.no_eol else line + b"\n")
        out.flush()
        seen += 1
        return bool(args.count and seen >= args.count)

    async def session(client: Client, resumed: bool) -> bool:
        """Subscribe and print; True when done. ClientError when the connection is lost."""
        codes = await client.subscribe([(f, args.qos) for f in filters], properties=conn.subscribe_props)
        refused = [(f, c) for f, c in zip(filters, codes, strict=True) if c >= 0x80]
        for filt, code in refused:
            _say_error(conn, f"subscription to {filt} refused by {client.server} (code {code:#x})")
        if len(refused) == len(filters):
            _say_error(conn, "All subscription requests were denied.")
            raise Fatal(EXIT_ERROR)
        if args.exit_after_subscribe:
            return True
        async for msg in client.messages():
            if args.retained_only and not msg.retain:
                return True
            if show(msg):
                return True
        return False  # not reached: messages() raises when the connection ends

    async def go() -> None:
        from zmesh.mqtt.client import ClientError

        client = conn.client()
        await conn.connect(client)  # the first connection's failure is final, as in mosquitto_sub
        attempt = 0
        try:
            while True:
                lost = "the connection ended"
                try:
                    if await session(client, attempt > 0):
                        return
                except ClientError as exc:
                    if args.no_reconnect:
                        raise
                    lost = str(exc)
                await client.disconnect()
                _say_reconnect(conn, f"connection lost ({lost}); reconnecting")
                client = await _reconnect(conn)
                _say_reconnect(conn, f"reconnected to {client.server}")
                attempt += 1
        finally:
            await client.disconnect(conn.disconnect_props)

    async def bounded() -> None:
        if args.timeout:
            try:
                await asyncio.wait_for(go(), args.timeout)
            except TimeoutError:
                raise Fatal(EXIT_TIMEOUT) from None
        else:
            await go()

    return _run(bounded())


def _say_reconnect(conn: Conn, text: str) -> None:
    if not conn.quiet:
        print(f"zmesh: {text}", file=sys.stderr, flush=True)


async def _reconnect(conn: Conn) -> Client:
    """Connect again with backoff until it works (a restarting node), resuming the session:
    the same client id, and with -c clean start off so the server's session is taken up."""
    from zmesh.mqtt.client import ClientError

    attempt = 0
    last = ""
    while True:
        await asyncio.sleep(reconnect_delay(attempt))
        client = conn.client()
        try:
            await conn.connect(client, timeout=5.0)
            return client
        except ClientError as exc:
            if exc.code != EXIT_ERROR:  # refused by CONNACK (credentials changed?): final
                raise
            if str(exc) != last:
                _say_reconnect(conn, f"still trying: {exc}")
                last = str(exc)
        attempt += 1


# ---------------------------------------------------------------------------- wait


def wait_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="zmesh wait", add_help=False, description=(
        "Wait until a node answers MQTT (and, with --peers N, sees N peers up), for scripts that "
        "start nodes in the background: exit 0 when ready, 27 if -W expires first."))
    _common(parser, default_qos=False)
    add = parser.add_argument
    add("--peers", type=int, default=0, metavar="N", help="Also wait until the node sees this many peers up.")
    add("-W", "--timeout", type=float, default=30.0, metavar="SECONDS", help="Give up (exit 27) after this many seconds (default 30).")
    return parser


def run_wait(args: argparse.Namespace) -> int:
    import json

    conn = connection(args)
    last = ["no answer yet"]

    async def ready() -> None:
        from zmesh.mqtt.client import ClientError

        attempt = 0
        while True:
            client = conn.client()
            try:
                await conn.connect(client, timeout=2.0)
            except ClientError as exc:
                if exc.code != EXIT_ERROR:
                    raise  # the node answered and refused us: waiting will not help
                last[0] = str(exc)
                await asyncio.sleep(min(0.05 * (2 ** attempt), 0.5))
                attempt += 1
                continue
            try:
                if not args.peers:
                    return
                await client.subscribe([("$SYS/zmesh/peers", 0)])
                async for msg in client.messages():
                    up = sorted(p["name"] for p in json.loads(msg.payload) if p.get("state") == "up")
                    last[0] = f"{client.server} sees {len(up)} of {args.peers} peers up ({', '.join(up) or 'none'})"
                    if len(up) >= args.peers:
                        return
            except ClientError as exc:
                last[0] = str(exc)
            finally:
                await client.disconnect()

    async def bounded() -> None:
        try:
            await asyncio.wait_for(ready(), args.timeout)
        except TimeoutError:
            _say_error(conn, f"not ready within {args.timeout:g} s: {last[0]}")
            raise Fatal(EXIT_TIMEOUT) from None

    return _run(bounded())
