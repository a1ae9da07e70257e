"""The checkers of single configuration values (hosts, ports, paths, listeners, ...): each
takes the raw value and whether it came from the command line, and returns the checked
value or raises ``ValueError`` saying what is wrong. Pure: no I/O.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from zmesh.config.model import (
    _HOSTNAME_RE,
    DISCOVERY_MODES,
    LISTENER_PROTOCOLS,
    LOG_LEVELS,
    NAME_RE,
    STORE_SYNC_MODES,
    TLS_VERSIONS,
    ListenerConfig,
)

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


_Z85 = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
_Z85_VALUE = {c: i for i, c in enumerate(_Z85)}


def _z85_key_problem(key: str) -> str | None:
    """Why ``key`` is not a 40-character z85 CURVE key (32 bytes), or None. Five z85
    characters can spell more than 32 bits ("%%%%%"), so the alphabet alone is not enough."""
    if len(key) != 40:
        return f"got {len(key)} characters, not 40"
    if not set(key) <= _Z85_VALUE.keys():
        return "it has characters that z85 does not use"
    for i in range(0, 40, 5):
        value = 0
        for c in key[i : i + 5]:
            value = value * 85 + _Z85_VALUE[c]
        if value >= 1 << 32:
            return f"characters {i + 1}-{i + 5} are not z85 (over 32 bits)"
    return None


def parse_seed(s: str) -> tuple[str | None, str, int]:
    """Split a seed, ``HOST:PORT`` or ``KEY@HOST:PORT``, into ``(key or None, host, port)``.

    KEY is the seed's 40-character z85 CURVE public key (the ``public-key`` line of its
    NAME.key file). The z85 alphabet has ``@`` and ``:`` in it, but a host has no ``@``, so
    the last ``@`` is the separator. Raises ValueError quoting the input; whether the key is
    trusted is checked at start, where the trusted ring is read.
    """
    if not isinstance(s, str):
        raise ValueError(f"a seed must be a string [KEY@]HOST:PORT, not {type(s).__name__}")
    key: str | None = None
    address = s
    if "@" in s:
        key, _, address = s.rpartition("@")
        problem = _z85_key_problem(key)
        if problem is not None:
            raise ValueError(
                f"{s!r}: the part before '@' must be the seed's 40-character z85 CURVE public key "
                f"(the public-key line of its NAME.key file): {problem}"
            )
    host, port = parse_hostport(address)
    return key, host, port


def _peers(value: Any, cli: bool) -> tuple[str, ...]:
    if cli and isinstance(value, str):
        value = [p for p in (part.strip() for part in value.split(",")) if p]
    if not isinstance(value, list | tuple):
        raise ValueError(f'expected an array of "[KEY@]HOST:PORT" strings, got {_describe(value)}')
    peers: list[str] = []
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise ValueError(f'item {i}: expected a "[KEY@]HOST:PORT" string, got {_describe(item)}')
        try:
            _, _, port = parse_seed(item)
        except ValueError as exc:
            raise ValueError(f"item {i}: {exc}") from None
        if port == 0:
            raise ValueError(f"item {i}: {item!r}: port 0 cannot be dialled")
        peers.append(item)
    return tuple(peers)


def _groups(value: Any, cli: bool) -> tuple[str, ...]:
    if cli and isinstance(value, str):
        value = [g for g in (part.strip() for part in value.split(",")) if g]
    if not isinstance(value, list | tuple) or len(value) > 16:
        raise ValueError(f"expected an array of at most 16 group names, got {_describe(value)}")
    for i, item in enumerate(value):
        if not isinstance(item, str) or not NAME_RE.fullmatch(item):
            raise ValueError(f"item {i}: expected a name of letters, digits, '_', '.', '-' (1 to 64)")
    return tuple(value)


def _mesh_policy(value: Any, cli: bool) -> tuple[tuple[str, tuple[str, ...]], ...]:
    from zmesh.mesh.policy import PolicyError, validate_rules

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
