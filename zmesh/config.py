"""Node configuration: TOML text to frozen dataclasses.

Pure apart from reading the one file it is given: no sockets, no asyncio, and no checks that
paths exist (that is the caller's business when it opens them, and keeps this testable).

Every error is a ``ConfigError`` whose message reads ``<file>: <dotted.key>: <what is wrong>``
so that an operator can go straight to the line. Values given on the command line (the
``overrides`` mapping) are reported as coming from ``<command line>``. Unknown keys are errors,
not warnings: a misspelt ``peer_expiry`` silently falling back to its default is exactly the
kind of mistake that costs an afternoon.

Layout::

    [node]  name, data_dir
    [mesh]  listen, cert, trusted, peers, heartbeat_interval, peer_expiry, advertise_host, policy
    [mqtt]  listen, max_packet_size, max_inflight, max_queued, password_file, acl_file,
            allow_anonymous, max_sessions, persistent_client_expiration, topic_alias_maximum
    [[mqtt.listeners]] address, protocol, certfile, keyfile, cafile, capath,
            require_certificate, use_identity_as_username, tls_version, ciphers
    [discovery] mode, interface, dns_name, dns_port, dns_interval
    [retained] max_entries, max_bytes, tombstone_ttl, anti_entropy_interval
    [store] sync, sync_interval, key_file, previous_key_files
    [jobs]  lease, max_attempts
    [log]   level
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

COMMAND_LINE = "<command line>"
DEFAULTS = "<defaults>"

LOG_LEVELS = ("debug", "info", "warning", "error")
NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# RFC 1123 host names (plus "_", which real-world service names use); IPv4 matches too.
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
# The largest MQTT packet the fixed header can describe (the variable byte integer limit).
MQTT_MAX_PACKET = 268_435_455
_MAX_CONFIG_BYTES = 1024 * 1024


class ConfigError(Exception):
    """A configuration problem; ``str()`` is ``"<file>: <dotted.key>: <what is wrong>"``."""

    def __init__(self, file: str, key: str, message: str) -> None:
        self.file = file
        self.key = key
        self.message = message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


@dataclass(frozen=True)
class MeshConfig:
    listen: str = "127.0.0.1:7100"
    cert: Path | None = None  # this node's NAME.key_secret
    trusted: Path | None = None  # directory of trusted *.key files (default: cert's directory)
    peers: tuple[str, ...] = ()  # seed peers, HOST:PORT
    heartbeat_interval: float = 1.0
    peer_expiry: float = 5.0
    peer_evasive: float | None = None  # silence after which a peer shows as evasive (default: expiry / 2)
    advertise_host: str | None = None  # host other nodes use to reach us when listen is 0.0.0.0
    # [mesh.policy]: peer name glob (or "key:<z85>") -> topic filters it may publish to
    policy: tuple[tuple[str, tuple[str, ...]], ...] = ()


LISTENER_PROTOCOLS = ("mqtt", "websockets")  # Mosquitto's words for a listener's `protocol`
TLS_VERSIONS = ("tlsv1.2", "tlsv1.3")  # a listener's minimum; older ones are refused


@dataclass(frozen=True)
class ListenerConfig:
    """One MQTT listener (``[[mqtt.listeners]]``); the options keep Mosquitto's names.

    TLS is on when ``certfile`` is set. ``key`` says where it was configured
    (``mqtt.listen`` or ``mqtt.listeners[N]``) so that startup errors can name it."""

    address: str  # HOST:PORT to bind (Mosquitto: `listener PORT HOST`)
    protocol: str = "mqtt"  # "mqtt" (TCP) or "websockets" (RFC 6455, subprotocol "mqtt")
    certfile: Path | None = None  # PEM server certificate chain
    keyfile: Path | None = None  # PEM private key, unencrypted
    cafile: Path | None = None  # CA certificates that client certificates are checked against
    capath: Path | None = None  # a c_rehash'ed directory of CA certificates
    require_certificate: bool = False  # refuse a TLS client without a valid certificate
    use_identity_as_username: bool = False  # the client certificate's CN is the username
    tls_version: str = "tlsv1.2"  # the minimum TLS version
    ciphers: str | None = None  # OpenSSL cipher list for TLS <= 1.2 (None: OpenSSL's default)
    key: str = field(default="mqtt.listen", compare=False)

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def scheme(self) -> str:
        """What a client's URL would say: mqtt, mqtts, ws or wss."""
        return {"mqtt": "mqtt", "websockets": "ws"}[self.protocol] + ("s" if self.tls else "")

    def describe(self) -> str:
        """``mqtt.listeners[1] (mqtts)``, for log lines: the config entry and its kind."""
        return f"{self.key} ({self.scheme})"


@dataclass(frozen=True)
class MqttConfig:
    listen: str | None = "127.0.0.1:1883"  # None disables the MQTT listener
    max_packet_size: int = 1_048_576
    max_inflight: int = 20
    max_queued: int = 10_000  # a mesh frame brings up to 1024 messages at once: room for bursts
    # Sessions (zmesh.mqtt.sessions): persistent sessions kept while their client is away,
    # at most this many (the longest-away one goes first); 3.1.1 clean-session-0 and MQTT 5
    # "never expires" sessions end after persistent_client_expiration seconds away (0: never,
    # Mosquitto's default).
    max_sessions: int = 10_000
    persistent_client_expiration: float = 0.0
    topic_alias_maximum: int = 10  # inbound MQTT 5 topic aliases per client (Mosquitto's max_topic_alias)
    # More listeners (TLS, WebSocket). When any are given, `listen` is off unless it is set
    # explicitly, as a `listener` line in mosquitto.conf replaces Mosquitto's default one.
    listeners: tuple[ListenerConfig, ...] = ()
    # Mosquitto-format users and ACLs (zmesh.auth). allow_anonymous None: allowed exactly
    # when there is no password_file.
    password_file: Path | None = None
    acl_file: Path | None = None
    allow_anonymous: bool | None = None

    @property
    def all_listeners(self) -> tuple[ListenerConfig, ...]:
        """Every listener to open: the plain ``listen`` (if set) first, then ``listeners``."""
        default = (ListenerConfig(self.listen),) if self.listen else ()
        return default + self.listeners


DISCOVERY_MODES = ("static", "mdns", "dns")


@dataclass(frozen=True)
class DiscoveryConfig:
    mode: tuple[str, ...] = ("static",)  # any of static, mdns, dns
    interface: str | None = None  # mDNS interface (default: the one holding mesh.listen's address)
    dns_name: str | None = None  # a headless Service name, resolved for peers
    dns_port: int | None = None  # the peers' control port (default: our own; SRV records win)
    dns_interval: float = 5.0


@dataclass(frozen=True)
class RetainedConfig:
    max_entries: int = 0  # live retained topics per node (0: unlimited)
    max_bytes: int = 0  # their payload bytes (0: unlimited)
    tombstone_ttl: float = 86_400.0  # seconds a delete is remembered against stale copies
    anti_entropy_interval: float = 30.0  # seconds between digest comparisons with each peer


STORE_SYNC_MODES = ("always", "interval")


@dataclass(frozen=True)
class StoreConfig:
    sync: str = "always"  # "always": on disk before PUBACK; "interval": every sync_interval
    sync_interval: float = 1.0
    key_file: Path | None = None  # AES-256-GCM key (zmesh keys create); None: plaintext
    previous_key_files: tuple[Path, ...] = ()  # keys rows may still be under, during rotation


@dataclass(frozen=True)
class JobsConfig:
    lease: float = 30.0  # seconds a worker may hold a job before it is delivered again
    max_attempts: int = 5  # deliveries before a job goes to the dead letters


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: Path | None = None
    mesh: MeshConfig = field(default_factory=MeshConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    log: LogConfig = field(default_factory=LogConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    retained: RetainedConfig = field(default_factory=RetainedConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    source: str = DEFAULTS  # the config file this came from, for error messages downstream


# ---------------------------------------------------------------------------- addresses


def _check_host(host: str, original: str) -> str:
    """Validate a bare host (brackets already removed); returns it unchanged."""
    if not host:
        raise ValueError(f"{original!r}: missing host (use 0.0.0.0 or [::] for all interfaces)")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{original!r}: {host!r} is not a valid IPv6 address") from None
        return host
    if len(host) > 253 or not _HOSTNAME_RE.fullmatch(host) or ".." in host:
        raise ValueError(f"{original!r}: {host!r} is not a valid host name or IP address")
    if host.replace(".", "").isdigit():
        # All digits and dots: meant as IPv4, so "10.0.0.256" is a typo, not a host name.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{original!r}: {host!r} is not a valid IPv4 address") from None
    return host


def parse_hostport(s: str, default_port: int | None = None) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 as ``[::1]:7100``) into a bare host and a port.

    The port may be omitted when ``default_port`` is given. Port 0 is accepted (it means
    "ephemeral" when binding); callers that dial must refuse it themselves. Raises ValueError
    with a message that quotes the input.
    """
    if not isinstance(s, str):
        raise ValueError(f"address must be a string HOST:PORT, not {type(s).__name__}")
    if not s or s != s.strip():
        raise ValueError(f"{s!r}: expected HOST:PORT, e.g. 127.0.0.1:7100 or [::1]:7100")
    port_text: str | None
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep:
            raise ValueError(f"{s!r}: missing ']' after the IPv6 address")
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"{s!r}: expected ':PORT' after ']'")
        if ":" not in host:
            # Brackets are for IPv6 only; "[localhost]:1" is a typo worth catching.
            raise ValueError(f"{s!r}: brackets are only for IPv6 addresses")
    else:
        if s.count(":") > 1:
            raise ValueError(f"{s!r}: write IPv6 addresses in brackets, e.g. [::1]:7100")
        host, sep, port_text_raw = s.partition(":")
        port_text = port_text_raw if sep else None
    _check_host(host, s)
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{s!r}: missing port, expected HOST:PORT")
        return host, default_port
    # int() alone would accept " 1", "+1", "1_000" and non-ASCII digits.
    if not port_text.isascii() or not port_text.isdigit() or len(port_text) > 5:
        raise ValueError(f"{s!r}: port {port_text!r} is not a number from 0 to 65535")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"{s!r}: port {port} is out of range (0-65535)")
    return host, port


# ---------------------------------------------------------------------------- value checks

# Each checker takes (value, from_command_line) and returns the converted value or raises
# ValueError with the "what is wrong" part of the message. Command-line values arrive as
# strings, so numbers are parsed there; in a TOML file a number in quotes is a type error.


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (None)"
    kinds = {
        bool: "boolean",
        int: "integer",
        float: "float",
        str: "string",
        list: "array",
        tuple: "array",
        dict: "table",
    }
    kind = kinds.get(type(value), type(value).__name__)
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}" if kind != "table" else "a table"


def _str(value: Any, cli: bool) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_describe(value)}")
    return value


def _int(value: Any, cli: bool) -> int:
    if cli and isinstance(value, str):
        try:
            return int(value.strip(), 10)
        except ValueError:
            raise ValueError(f"expected an integer, got {value!r}") from None
    # bool is a subclass of int, but `max_inflight = true` is a mistake, not 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {_describe(value)}")
    return value


def _float(value: Any, cli: bool) -> float:
    if cli and isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"expected a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):  # TOML has inf and nan; neither is a usable interval
        raise ValueError(f"expected a finite number, got {value}")
    return value


def _positive_float(value: Any, cli: bool) -> float:
    result = _float(value, cli)
    if result <= 0:
        raise ValueError(f"must be greater than 0, got {result:g}")
    return result


def _non_negative_float(value: Any, cli: bool) -> float:
    result = _float(value, cli)
    if result < 0:
        raise ValueError(f"must be 0 or more, got {result:g}")
    return result


def _int_range(low: int, high: int) -> Callable[[Any, bool], int]:
    def check(value: Any, cli: bool) -> int:
        result = _int(value, cli)
        if not low <= result <= high:
            raise ValueError(f"must be from {low} to {high}, got {result}")
        return result

    return check


def _name(value: Any, cli: bool) -> str:
    name = _str(value, cli)
    if not NAME_RE.fullmatch(name):
        raise ValueError(
            f"{name!r} is not a valid node name: use 1-64 characters from A-Z a-z 0-9 _ . -"
        )
    return name


def _path(value: Any, cli: bool) -> Path:
    if cli and isinstance(value, os.PathLike):
        value = os.fspath(value)
    text = _str(value, cli)
    if not text or "\x00" in text:
        raise ValueError(
            "expected a path, got an empty string" if not text else "path contains a NUL character"
        )
    return Path(text).expanduser()


def _listen(value: Any, cli: bool) -> str:
    address = _str(value, cli)
    parse_hostport(address)
    return address


def _optional_listen(value: Any, cli: bool) -> str | None:
    if value is None or value == "":
        return None  # "" disables the listener (TOML has no null)
    return _listen(value, cli)


def _peers(value: Any, cli: bool) -> tuple[str, ...]:
    if cli and isinstance(value, str):
        value = [p for p in (part.strip() for part in value.split(",")) if p]
    if not isinstance(value, list | tuple):
        raise ValueError(f'expected an array of "HOST:PORT" strings, got {_describe(value)}')
    peers: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f'item {i}: expected a "HOST:PORT" string, got {_describe(item)}')
        try:
            _, port = parse_hostport(item)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
        if port == 0:
            raise ValueError(f"item {i}: {item!r}: port 0 cannot be dialled")
        peers.append(item)
    return tuple(peers)


def _mesh_policy(value: Any, cli: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    from zmesh.meshpolicy import PolicyError, validate_rules

    if not isinstance(value, dict):
        raise ValueError(
            'expected a table of peer name patterns to arrays of topic filters, e.g. '
            f'[mesh.policy] "scanner-*" = ["scans/#"], got {_describe(value)}'
        )
    try:
        return validate_rules(value.items())
    except PolicyError as exc:
        raise ValueError(str(exc)) from None


def _advertise_host(value: Any, cli: bool) -> str:
    host = _str(value, cli)
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    _check_host(bare, host)
    return bare  # the mesh adds brackets itself when it builds an endpoint


def _modes(value: Any, cli: bool) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [p for p in (part.strip() for part in value.split(",")) if p]
    if not isinstance(value, list | tuple) or not value:
        raise ValueError(f"expected one of {', '.join(DISCOVERY_MODES)} or an array of them, got {_describe(value)}")
    for item in value:
        if item not in DISCOVERY_MODES:
            raise ValueError(f"{item!r} is not a discovery mode; expected {', '.join(DISCOVERY_MODES)}")
    return tuple(dict.fromkeys(value))


def _interface(value: Any, cli: bool) -> str:
    name = _str(value, cli)
    if not 0 < len(name) < 16 or "/" in name or " " in name:
        raise ValueError(f"{name!r} is not a network interface name")
    return name


def _dns_name(value: Any, cli: bool) -> str:
    name = _str(value, cli).rstrip(".")
    _check_host(name, name)
    return name


def _store_sync(value: Any, cli: bool) -> str:
    mode = _str(value, cli)
    if mode not in STORE_SYNC_MODES:
        raise ValueError(f"{mode!r}: expected one of {', '.join(STORE_SYNC_MODES)}")
    return mode


def _paths(value: Any, cli: bool) -> tuple[Path, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(f"expected an array of paths, got {_describe(value)}")
    return tuple(_path(item, cli) for item in value)


def _level(value: Any, cli: bool) -> str:
    level = _str(value, cli).lower()
    if level not in LOG_LEVELS:
        raise ValueError(f"{value!r} is not a log level; expected one of {', '.join(LOG_LEVELS)}")
    return level


# ---------------------------------------------------------------------------- MQTT listeners


class _AtKey(ValueError):
    """A ValueError about one part of a structured value: ``suffix`` (``[1].keyfile``) is
    appended to the dotted key so that the error names the exact entry and field."""

    def __init__(self, suffix: str, message: str) -> None:
        super().__init__(message)
        self.suffix = suffix


def _bool(value: Any, cli: bool) -> bool:
    if cli and isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected true or false, got {value!r}")
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_describe(value)}")
    return value


def _listener_protocol(value: Any, cli: bool) -> str:
    protocol = _str(value, cli)
    if protocol in LISTENER_PROTOCOLS:
        return protocol
    hint = ""
    if protocol.lower() in ("ws", "wss", "websocket", "websockets"):
        hint = ' (did you mean "websockets"? TLS comes from certfile, not from the protocol)'
    elif protocol.lower() in ("mqtts", "tls", "ssl", "tcp"):
        hint = ' (did you mean "mqtt"? TLS comes from certfile and keyfile)'
    raise ValueError(f"{protocol!r} is not a listener protocol; expected mqtt or websockets{hint}")


def _tls_version(value: Any, cli: bool) -> str:
    version = _str(value, cli).lower()
    if version in ("tlsv1", "tlsv1.0", "tlsv1.1"):
        raise ValueError(f"{value!r}: TLS older than 1.2 is not supported; use tlsv1.2 or tlsv1.3")
    if version not in TLS_VERSIONS:
        raise ValueError(f"{value!r} is not a TLS version; expected tlsv1.2 or tlsv1.3 (the minimum)")
    return version


def _ciphers(value: Any, cli: bool) -> str:
    text = _str(value, cli)
    if not text.strip():
        raise ValueError("expected an OpenSSL cipher list, got an empty string")
    return text


_LISTENER_KEYS: dict[str, Callable[[Any, bool], Any]] = {
    "address": _listen,
    "protocol": _listener_protocol,
    "certfile": _path,
    "keyfile": _path,
    "cafile": _path,
    "capath": _path,
    "require_certificate": _bool,
    "use_identity_as_username": _bool,
    "tls_version": _tls_version,
    "ciphers": _ciphers,
}
# Options that only mean something with TLS on the listener (bools only when true).
_TLS_ONLY = ("cafile", "capath", "require_certificate", "use_identity_as_username", "tls_version", "ciphers")
# mosquitto.conf words an operator may carry over, and what zmesh says instead.
_MOSQUITTO_LISTENER_WORDS = {
    "port": 'write address = "HOST:PORT"',
    "listener": 'write address = "HOST:PORT"',
    "bind_address": 'write address = "HOST:PORT"',
    "bind_interface": 'write address = "HOST:PORT" with the interface\'s address',
    "path": "any WebSocket path is accepted, as in Mosquitto",
}


def _listener_hint(name: str) -> str:
    if name in _MOSQUITTO_LISTENER_WORDS:
        return f" ({_MOSQUITTO_LISTENER_WORDS[name]})"
    close = difflib.get_close_matches(name, list(_LISTENER_KEYS), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else f"; known: {', '.join(_LISTENER_KEYS)}"


def _listener(entry: Any, index: int, cli: bool) -> ListenerConfig:
    at = f"[{index}]"
    if not isinstance(entry, dict):
        raise _AtKey(at, f"expected a table ([[mqtt.listeners]]), got {_describe(entry)}")
    checked: dict[str, Any] = {}
    for name, raw in entry.items():
        checker = _LISTENER_KEYS.get(name)
        if checker is None:
            raise _AtKey(f"{at}.{name}", f"unknown key{_listener_hint(name)}")
        try:
            checked[name] = checker(raw, cli)
        except ValueError as exc:
            raise _AtKey(f"{at}.{name}", str(exc)) from None
    if "address" not in checked:
        raise _AtKey(f"{at}.address", 'required: the "HOST:PORT" to listen on')
    tls = "certfile" in checked
    if "keyfile" in checked and not tls:
        raise _AtKey(f"{at}.certfile", "required with keyfile: TLS needs both")
    if tls and "keyfile" not in checked:
        raise _AtKey(f"{at}.keyfile", "required with certfile: TLS needs both")
    if not tls:
        for name in _TLS_ONLY:
            if checked.get(name) not in (None, False):
                raise _AtKey(f"{at}.{name}", "needs TLS on this listener: set certfile and keyfile")
    if checked.get("require_certificate") and "cafile" not in checked and "capath" not in checked:
        raise _AtKey(
            f"{at}.require_certificate",
            "needs cafile or capath: the CA certificates that client certificates are checked against",
        )
    if checked.get("use_identity_as_username") and not checked.get("require_certificate"):
        raise _AtKey(
            f"{at}.use_identity_as_username",
            "needs require_certificate = true: without a verified client certificate there is "
            "no identity to use",
        )
    return ListenerConfig(key=f"mqtt.listeners[{index}]", **checked)


def _listeners(value: Any, cli: bool) -> tuple[ListenerConfig, ...]:
    if not isinstance(value, list | tuple):
        raise ValueError(
            f"expected [[mqtt.listeners]] tables (an array of tables), got {_describe(value)}"
        )
    return tuple(_listener(entry, i, cli) for i, entry in enumerate(value))


def _rebase_listener(listener: ListenerConfig, base: Path) -> ListenerConfig:
    """Relative certificate paths are relative to ``base`` (the config file's directory)."""
    changes = {
        name: base / path
        for name in ("certfile", "keyfile", "cafile", "capath")
        if (path := getattr(listener, name)) is not None and not path.is_absolute()
    }
    return replace(listener, **changes) if changes else listener


def _check_listener_addresses(listen: str | None, listeners: tuple[ListenerConfig, ...]) -> None:
    """Two listeners on one fixed address: the second would fail to bind at startup; say
    which entries clash now. (Port 0 is a fresh port each time, never a clash.)"""
    seen: dict[tuple[str, int], str] = {}
    if listen:
        host, port = parse_hostport(listen)
        if port:
            seen[(host, port)] = "mqtt.listen"
    for i, listener in enumerate(listeners):
        host, port = parse_hostport(listener.address)
        if not port:
            continue
        if (host, port) in seen:
            raise _AtKey(f"[{i}].address", f"{listener.address!r} is already used by {seen[(host, port)]}")
        seen[(host, port)] = f"mqtt.listeners[{i}]"


# (table, key) -> (checker, is a path, None allowed from the command line)
_Checker = Callable[[Any, bool], Any]
_SCHEMA: dict[str, dict[str, tuple[_Checker, bool, bool]]] = {
    "node": {
        "name": (_name, False, False),
        "data_dir": (_path, True, True),
    },
    "mesh": {
        "listen": (_listen, False, False),
        "cert": (_path, True, True),
        "trusted": (_path, True, True),
        "peers": (_peers, False, False),
        "heartbeat_interval": (_positive_float, False, False),
        "peer_expiry": (_positive_float, False, False),
        "peer_evasive": (_positive_float, False, True),
        "advertise_host": (_advertise_host, False, True),
        "policy": (_mesh_policy, False, False),
    },
    "mqtt": {
        "listen": (_optional_listen, False, True),
        "max_packet_size": (_int_range(16, MQTT_MAX_PACKET), False, False),
        "max_inflight": (_int_range(1, 65535), False, False),  # MQTT 5 receive maximum is 16-bit
        "max_queued": (_int_range(0, 10_000_000), False, False),
        "max_sessions": (_int_range(0, 10_000_000), False, False),
        "persistent_client_expiration": (_non_negative_float, False, False),
        "topic_alias_maximum": (_int_range(0, 65535), False, False),
        "listeners": (_listeners, False, False),
        "password_file": (_path, True, True),
        "acl_file": (_path, True, True),
        "allow_anonymous": (_bool, False, True),
    },
    "log": {
        "level": (_level, False, False),
    },
    "retained": {
        "max_entries": (_int_range(0, 1 << 40), False, False),
        "max_bytes": (_int_range(0, 1 << 50), False, False),
        "tombstone_ttl": (_positive_float, False, False),
        "anti_entropy_interval": (_positive_float, False, False),
    },
    "store": {
        "sync": (_store_sync, False, False),
        "sync_interval": (_positive_float, False, False),
        "key_file": (_path, True, True),
        "previous_key_files": (_paths, False, False),
    },
    "jobs": {
        "lease": (_positive_float, False, False),
        "max_attempts": (_int_range(1, 1_000_000), False, False),
    },
    "discovery": {
        "mode": (_modes, False, False),
        "interface": (_interface, False, True),
        "dns_name": (_dns_name, False, True),
        "dns_port": (_int_range(1, 65535), False, True),
        "dns_interval": (_positive_float, False, False),
    },
}
_KNOWN_KEYS = [f"{table}.{key}" for table, keys in _SCHEMA.items() for key in keys]


def _suggest(dotted: str) -> str:
    """A ' (did you mean X?)' hint for an unknown key or table, or ''."""
    table, _, leaf = dotted.rpartition(".")
    # The right key in the wrong table ("[mesh] name = ...") is the most common slip.
    same_leaf = [k for k in _KNOWN_KEYS if k.rpartition(".")[2] == leaf]
    if same_leaf:
        return f" (did you mean {same_leaf[0]}?)"
    if not table:
        # A top-level name: a misspelt table, or a key that belongs in some table.
        close = difflib.get_close_matches(leaf, list(_SCHEMA), n=1, cutoff=0.6)
        if close:
            return f" (did you mean [{close[0]}]?)"
        leaves = {k.rpartition(".")[2]: k for k in _KNOWN_KEYS}
        close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.6)
        return f" (did you mean {leaves[close[0]]}?)" if close else ""
    if table not in _SCHEMA:
        close = difflib.get_close_matches(table, list(_SCHEMA), n=1, cutoff=0.6)
        if not close:
            return ""
        table = close[0]
    # Compare leaf to leaf: a shared "mesh." prefix would make any two keys look alike.
    close = difflib.get_close_matches(leaf, list(_SCHEMA[table]), n=1, cutoff=0.6)
    return f" (did you mean {table}.{close[0]}?)" if close else ""


# ---------------------------------------------------------------------------- loading


def _read_toml(path: Path) -> dict[str, Any]:
    file = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(_MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(file, "", "config file not found") from None
    except IsADirectoryError:
        raise ConfigError(file, "", "is a directory, not a config file") from None
    except OSError as exc:
        raise ConfigError(file, "", f"cannot read config file: {exc.strerror or exc}") from None
    if len(data) > _MAX_CONFIG_BYTES:
        raise ConfigError(file, "", f"larger than {_MAX_CONFIG_BYTES} bytes; not a config file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(file, "", f"not UTF-8 text (byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError(
            file, "", "TOML syntax error: arrays or tables nested too deeply"
        ) from None


def _flatten(doc: Mapping[str, Any], file: str) -> dict[str, Any]:
    """``{"mesh": {"listen": x}}`` -> ``{"mesh.listen": x}``; unknown names are errors."""
    flat: dict[str, Any] = {}
    for table, content in doc.items():
        if table not in _SCHEMA:
            raise ConfigError(
                file,
                table,
                f"unknown {'table' if isinstance(content, dict) else 'key'}{_suggest(table)}",
            )
        if not isinstance(content, dict):
            raise ConfigError(file, table, f"expected a table [{table}], got {_describe(content)}")
        for key, value in content.items():
            dotted = f"{table}.{key}"
            if key not in _SCHEMA[table]:
                raise ConfigError(file, dotted, f"unknown key{_suggest(dotted)}")
            flat[dotted] = value
    return flat


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Load a node's configuration: defaults, then the TOML file (if any), then ``overrides``.

    ``overrides`` maps dotted keys to values from the command line (strings, paths, lists);
    they win over the file. Relative paths are resolved against the config file's directory
    for values from the file (so a config works from any cwd) and against the cwd for
    values from the command line (where the user typed them).
    """
    # dotted key -> (raw value, origin label, directory that relative paths are relative to)
    raw: dict[str, tuple[Any, str, Path]] = {}
    if path is not None:
        path = Path(path)
        file = str(path)
        # resolve() the directory so "../conf" from another cwd does not leave a dangling
        # "elsewhere/../" in every path; the values themselves are joined, not resolved, so a
        # symlinked cert (a Kubernetes secret mount) is still followed afresh on each open.
        base = path.expanduser().absolute().parent.resolve()
        for dotted, value in _flatten(_read_toml(path.expanduser()), file).items():
            raw[dotted] = (value, file, base)
        source = file
    else:
        source = COMMAND_LINE if overrides else DEFAULTS

    cwd = Path.cwd()
    for dotted, value in (overrides or {}).items():
        if dotted not in _KNOWN_KEYS:
            raise ConfigError(COMMAND_LINE, str(dotted), f"unknown key{_suggest(str(dotted))}")
        raw[dotted] = (value, COMMAND_LINE, cwd)

    values: dict[str, Any] = {}
    for dotted, (value, origin, base) in raw.items():
        table, key = dotted.split(".", 1)
        checker, is_path, none_ok = _SCHEMA[table][key]
        cli = origin == COMMAND_LINE
        if value is None and cli and none_ok:
            values[dotted] = None  # an explicit "unset" from the API/command line
            continue
        try:
            checked = checker(value, cli)
        except ValueError as exc:
            raise ConfigError(origin, dotted + getattr(exc, "suffix", ""), str(exc)) from None
        if is_path and not checked.is_absolute():
            checked = base / checked
        elif isinstance(checked, tuple) and checked and isinstance(checked[0], Path):
            checked = tuple(p if p.is_absolute() else base / p for p in checked)
        elif isinstance(checked, tuple) and checked and isinstance(checked[0], ListenerConfig):
            checked = tuple(_rebase_listener(listener, base) for listener in checked)
        values[dotted] = checked

    if values.get("node.name") is None:
        where = source if path is not None else COMMAND_LINE
        raise ConfigError(
            where, "node.name", 'required: every node needs a name ([node] name = "..." or --name)'
        )

    heartbeat = values.get("mesh.heartbeat_interval", MeshConfig.heartbeat_interval)
    expiry = values.get("mesh.peer_expiry", MeshConfig.peer_expiry)
    if expiry <= heartbeat:
        # Blame whichever of the two was given (the command line's if both were).
        blamed = "mesh.peer_expiry" if "mesh.peer_expiry" in raw else "mesh.heartbeat_interval"
        origin = raw[blamed][1] if blamed in raw else source
        raise ConfigError(
            origin,
            blamed,
            f"mesh.peer_expiry ({expiry:g} s) must be greater than mesh.heartbeat_interval "
            f"({heartbeat:g} s), or peers expire between two heartbeats",
        )

    discovery_modes = values.get("discovery.mode", DiscoveryConfig.mode)
    if "dns" in discovery_modes and not values.get("discovery.dns_name"):
        origin = raw["discovery.mode"][1] if "discovery.mode" in raw else source
        raise ConfigError(origin, "discovery.dns_name", 'required with mode "dns" (or --dns-name)')
    evasive = values.get("mesh.peer_evasive")
    if evasive is not None and evasive >= expiry:
        raise ConfigError(
            raw["mesh.peer_evasive"][1], "mesh.peer_evasive",
            f"must be less than mesh.peer_expiry ({expiry:g} s)",
        )

    if values.get("mqtt.listeners") and "mqtt.listen" not in values:
        values["mqtt.listen"] = None  # extra listeners replace the default one, as in Mosquitto
    try:
        _check_listener_addresses(values.get("mqtt.listen", MqttConfig.listen), values.get("mqtt.listeners", ()))
    except ValueError as exc:
        raise ConfigError(raw["mqtt.listeners"][1], "mqtt.listeners" + getattr(exc, "suffix", ""), str(exc)) from None

    def section(cls: type, table: str) -> Any:
        # Keys not given keep the dataclass defaults, so the defaults live in one place.
        given = {
            f.name: values[f"{table}.{f.name}"]
            for f in fields(cls)
            if f"{table}.{f.name}" in values
        }
        return cls(**given)

    return NodeConfig(
        name=values["node.name"],
        data_dir=values.get("node.data_dir"),
        mesh=section(MeshConfig, "mesh"),
        mqtt=section(MqttConfig, "mqtt"),
        log=section(LogConfig, "log"),
        discovery=section(DiscoveryConfig, "discovery"),
        retained=section(RetainedConfig, "retained"),
        store=section(StoreConfig, "store"),
        jobs=section(JobsConfig, "jobs"),
        source=source,
    )
