"""TOML to ``NodeConfig``: the schema (table, key -> checker), unknown keys with a
suggestion, cross-key rules, and the one file read. Pure apart from reading that file.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from zmesh.config.model import (
    _MAX_CONFIG_BYTES,
    COMMAND_LINE,
    DEFAULTS,
    DELIVERY_POLICIES,
    MQTT_MAX_PACKET,
    ConfigError,
    DeliveryConfig,
    DiscoveryConfig,
    HttpConfig,
    JobsConfig,
    ListenerConfig,
    LogConfig,
    MeshConfig,
    MqttConfig,
    NodeConfig,
    RetainedConfig,
    StoreConfig,
)
from zmesh.config.values import (
    _advertise_host,
    _bool,
    _check_listener_addresses,
    _describe,
    _dns_name,
    _groups,
    _int_range,
    _interface,
    _level,
    _listen,
    _listeners,
    _mesh_policy,
    _modes,
    _name,
    _non_negative_float,
    _optional_listen,
    _path,
    _paths,
    _peers,
    _positive_float,
    _rebase_listener,
    _store_sync,
    parse_hostport,
)

_Checker = Callable[[Any, bool], Any]


def _choice(allowed: tuple[str, ...]) -> _Checker:
    def check(value: Any, cli: bool) -> str:
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"must be one of {', '.join(repr(a) for a in allowed)}, got {_describe(value)}")
        return value

    return check
_SCHEMA: dict[str, dict[str, tuple[_Checker, bool, bool]]] = {
    "node": {
        "name": (_name, False, False),
        "data_dir": (_path, True, True),
        "shutdown_grace": (_positive_float, False, False),
    },
    "mesh": {
        "listen": (_listen, False, False),
        "events_port": (_int_range(0, 65535), False, False),
        "jobs_port": (_int_range(0, 65535), False, False),
        "cert": (_path, True, True),
        "trusted": (_path, True, True),
        "peers": (_peers, False, False),
        "heartbeat_interval": (_positive_float, False, False),
        "peer_expiry": (_positive_float, False, False),
        "peer_evasive": (_positive_float, False, True),
        "advertise_host": (_advertise_host, False, True),
        "policy": (_mesh_policy, False, False),
        "authority": (_path, True, True),
        "signer": (_path, True, True),
        "certificate": (_path, True, True),
        "groups": (_groups, False, False),
        "revocations": (_path, True, True),
        "identity_port": (_int_range(0, 65535), False, False),
        "max_message_size": (_int_range(0, 1 << 40), False, False),
    },
    "mqtt": {
        "listen": (_optional_listen, False, True),
        "max_packet_size": (_int_range(16, MQTT_MAX_PACKET), False, False),
        "max_inflight": (_int_range(1, 65535), False, False),  # MQTT 5 receive maximum is 16-bit
        "max_queued": (_int_range(0, 10_000_000), False, False),
        "max_sessions": (_int_range(0, 10_000_000), False, False),
        "persistent_client_expiration": (_non_negative_float, False, False),
        "topic_alias_maximum": (_int_range(0, 65535), False, False),
        "max_keepalive": (_int_range(0, 65535), False, False),
        "max_connections": (_int_range(-1, 10_000_000), False, False),
        "message_size_limit": (_int_range(0, MQTT_MAX_PACKET), False, False),
        "max_subscriptions": (_int_range(0, 10_000_000), False, False),
        "max_queued_bytes": (_int_range(0, 1 << 40), False, False),
        "max_queued_bytes_total": (_int_range(0, 1 << 42), False, False),
        "retain_available": (_bool, False, False),
        "maximum_qos": (_int_range(0, 2), False, False),
        "listeners": (_listeners, False, False),
        "password_file": (_path, True, True),
        "acl_file": (_path, True, True),
        "allow_anonymous": (_bool, False, True),
    },
    "http": {
        "listen": (_optional_listen, False, True),
    },
    "log": {
        "level": (_level, False, False),
    },
    "retained": {
        "max_entries": (_int_range(0, 1 << 40), False, False),
        "max_bytes": (_int_range(0, 1 << 50), False, False),
        "tombstone_ttl": (_positive_float, False, False),
        "anti_entropy_interval": (_positive_float, False, False),
        "max_clock_offset": (_positive_float, False, False),
        "sync_requests_per_second": (_positive_float, False, False),
        "sync_bytes_per_second": (_int_range(1024, 1 << 40), False, False),
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
    "delivery": {
        "policy": (_choice(DELIVERY_POLICIES), False, False),
        "outbox_max_bytes": (_int_range(64 * 1024, 1 << 40), False, False),
        "outbox_max_age": (_positive_float, False, False),
        "backfill_window": (_non_negative_float, False, False),
        "backfill_max_bytes": (_int_range(0, 1 << 40), False, False),
        "window": (_int_range(1, 1 << 20), False, False),
        "window_bytes": (_int_range(64 * 1024, 1 << 34), False, False),
        "session_backlog": (_int_range(1, 1 << 24), False, False),
        "block_max": (_positive_float, False, False),
        "stop_timeout": (_non_negative_float, False, False),
        "reorder_buffer": (_int_range(1, 1 << 20), False, False),
        "reorder_buffer_bytes": (_int_range(64 * 1024, 1 << 34), False, False),
        "give_up": (_positive_float, False, False),
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
        # normpath: "nodes/../data/alpha" in logs and errors reads as "data/alpha" (lexically:
        # no symlinks resolved, nothing on disk touched).
        if is_path and not checked.is_absolute():
            checked = Path(os.path.normpath(base / checked))
        elif isinstance(checked, tuple) and checked and isinstance(checked[0], Path):
            checked = tuple(p if p.is_absolute() else Path(os.path.normpath(base / p)) for p in checked)
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

    if "mesh.authority" in values:
        given = [k for k in ("mesh.signer", "mesh.certificate") if values.get(k) is not None]
        if len(given) != 1:
            raise ConfigError(
                raw["mesh.authority"][1], "mesh.authority",
                "a node admitted by certificate needs exactly one of mesh.signer (a group's signer "
                "file: it issues itself a certificate) or mesh.certificate (a chain issued for mesh.cert)",
            )
        if given == ["mesh.certificate"] and values.get("mesh.cert") is None:
            raise ConfigError(raw["mesh.certificate"][1], "mesh.certificate",
                              "a hand-issued certificate is for a fixed key: set mesh.cert too")
    else:
        for key in ("mesh.signer", "mesh.certificate", "mesh.revocations"):
            if values.get(key) is not None:
                raise ConfigError(raw[key][1], key, "only meaningful with mesh.authority")

    # The mesh sockets bind one host: two on one fixed port would fail at startup. With an
    # authority there is a fourth, the identity socket (by default on control port + 1).
    control = parse_hostport(values.get("mesh.listen", MeshConfig.listen))[1]
    mesh_ports = {"mesh.listen": control}
    if "mesh.authority" in values:
        mesh_ports["mesh.identity_port"] = values.get("mesh.identity_port") or (control + 1 if control else 0)
    for key in ("mesh.events_port", "mesh.jobs_port"):
        port = values.get(key, 0)
        clash = next((other for other, used in mesh_ports.items() if port and used == port), None)
        if clash is not None:
            raise ConfigError(raw[key][1], key, f"port {port} is already used by {clash}")
        mesh_ports[key] = port

    # The delivery bounds must nest: a stuck destination is detached before its messages age
    # out, and the receiver gives up on a hole only after the origin would have said GONE.
    max_age = values.get("delivery.outbox_max_age", DeliveryConfig.outbox_max_age)
    for key, ok, rule in (
        ("delivery.block_max", values.get("delivery.block_max", DeliveryConfig.block_max) < max_age, "less than"),
        ("delivery.give_up", values.get("delivery.give_up", DeliveryConfig.give_up) > max_age, "greater than"),
    ):
        if not ok:
            blamed = key if key in raw else "delivery.outbox_max_age"
            raise ConfigError(raw[blamed][1] if blamed in raw else source, blamed,
                              f"{key} must be {rule} delivery.outbox_max_age ({max_age:g} s)")

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
        shutdown_grace=values.get("node.shutdown_grace", NodeConfig.shutdown_grace),
        mesh=section(MeshConfig, "mesh"),
        mqtt=section(MqttConfig, "mqtt"),
        log=section(LogConfig, "log"),
        discovery=section(DiscoveryConfig, "discovery"),
        retained=section(RetainedConfig, "retained"),
        store=section(StoreConfig, "store"),
        jobs=section(JobsConfig, "jobs"),
        http=section(HttpConfig, "http"),
        delivery=section(DeliveryConfig, "delivery"),
        source=source,
        origins={dotted: origin for dotted, (_, origin, _) in raw.items()},
    )
