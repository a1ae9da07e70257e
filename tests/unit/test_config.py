"""Node configuration: defaults, a full file, overrides, paths, and errors that name file and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmesh.config import (
    ConfigError,
    LogConfig,
    MeshConfig,
    MqttConfig,
    NodeConfig,
    load_config,
    parse_hostport,
)

FULL = """
[node]
name = "alpha"
data_dir = "data/alpha"

[mesh]
listen = "0.0.0.0:7101"
cert = "../certs/alpha.key_secret"
trusted = "/etc/zmesh/trusted"
peers = ["10.0.0.2:7101", "[fd00::3]:7101", "beta.mesh.svc:7101"]
heartbeat_interval = 2          # an int where a float is expected: fine
peer_expiry = 7.5
advertise_host = "10.0.0.1"

[mqtt]
listen = "[::1]:0"
max_packet_size = 65536
max_inflight = 5
max_queued = 0

[log]
level = "DEBUG"
"""


def write(tmp_path: Path, text: str, name: str = "node.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(path: Path | None, overrides: dict | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value


# ---------------------------------------------------------------------------- loading


def test_defaults_with_only_a_name(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, '[node]\nname = "a"\n'))
    assert config == NodeConfig(name="a", source=str(tmp_path / "node.toml"))
    assert config.mesh == MeshConfig()
    assert config.mesh.listen == "127.0.0.1:7100" and config.mesh.peers == ()
    assert (config.mesh.heartbeat_interval, config.mesh.peer_expiry) == (1.0, 5.0)
    assert config.mqtt == MqttConfig(
        listen="127.0.0.1:1883", max_packet_size=1048576, max_inflight=20, max_queued=10_000
    )
    assert config.log == LogConfig(level="info")
    assert (
        config.data_dir is None and config.mesh.cert is None and config.mesh.advertise_host is None
    )


def test_no_file_only_overrides() -> None:
    config = load_config(None, {"node.name": "solo"})
    assert config.name == "solo"
    assert config.mesh == MeshConfig() and config.mqtt == MqttConfig()
    assert config.source == "<command line>"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load_config(None, {"node.name": "a"})
    with pytest.raises(AttributeError):
        config.name = "b"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        config.mesh.listen = "x"  # type: ignore[misc]


def test_full_file(tmp_path: Path) -> None:
    config_dir = tmp_path / "etc"
    config_dir.mkdir()
    config = load_config(write(config_dir, FULL))
    assert config.name == "alpha"
    assert config.data_dir == config_dir / "data" / "alpha"
    assert config.mesh == MeshConfig(
        listen="0.0.0.0:7101",
        cert=config_dir.parent / "certs" / "alpha.key_secret",  # "nodes/../certs" normalised
        trusted=Path("/etc/zmesh/trusted"),
        peers=("10.0.0.2:7101", "[fd00::3]:7101", "beta.mesh.svc:7101"),
        heartbeat_interval=2.0,
        peer_expiry=7.5,
        advertise_host="10.0.0.1",
    )
    assert isinstance(config.mesh.heartbeat_interval, float)
    assert config.mqtt == MqttConfig(
        listen="[::1]:0", max_packet_size=65536, max_inflight=5, max_queued=0
    )
    assert config.log.level == "debug"
    assert config.source == str(config_dir / "node.toml")


def test_example_node_configs_load() -> None:
    nodes = Path(__file__).resolve().parents[2] / "nodes"
    files = sorted(nodes.glob("*.toml"))
    if not files:
        pytest.skip("no example configs in nodes/")
    for file in files:
        config = load_config(file)
        assert config.name == file.stem
        assert config.mesh.cert is not None and config.mesh.cert.is_absolute()


def test_mqtt_listen_empty_string_disables(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n[mqtt]\nlisten = ""\n')
    assert load_config(path).mqtt.listen is None
    assert load_config(None, {"node.name": "a", "mqtt.listen": ""}).mqtt.listen is None
    assert load_config(None, {"node.name": "a", "mqtt.listen": None}).mqtt.listen is None


def test_advertise_host_ipv6_is_stored_bare() -> None:
    for given_host in ("[fd00::1]", "fd00::1"):
        config = load_config(None, {"node.name": "a", "mesh.advertise_host": given_host})
        assert config.mesh.advertise_host == "fd00::1"


# ---------------------------------------------------------------------------- overrides and paths


def test_overrides_beat_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, FULL)
    config = load_config(
        path,
        {
            "node.name": "other",
            "mesh.peers": ["h:1"],
            "mqtt.listen": "127.0.0.1:1884",
            "log.level": "warning",
            "mqtt.max_inflight": "30",  # command-line values arrive as strings
            "mesh.peer_expiry": "9",
        },
    )
    assert config.name == "other"
    assert config.mesh.peers == ("h:1",)
    assert config.mqtt.listen == "127.0.0.1:1884"
    assert config.log.level == "warning"
    assert config.mqtt.max_inflight == 30
    assert config.mesh.peer_expiry == 9.0
    # Untouched keys still come from the file.
    assert config.mesh.listen == "0.0.0.0:7101"
    assert config.mqtt.max_packet_size == 65536


def test_comma_separated_peers_from_the_command_line() -> None:
    config = load_config(None, {"node.name": "a", "mesh.peers": "a:1, b:2,"})
    assert config.mesh.peers == ("a:1", "b:2")


def test_relative_paths_from_file_resolve_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "conf"
    elsewhere = tmp_path / "elsewhere"
    config_dir.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the cwd must not matter for file values
    path = write(
        config_dir,
        '[node]\nname = "a"\ndata_dir = "d"\n[mesh]\ncert = "c/a.key_secret"\ntrusted = "/abs/t"\n',
    )
    config = load_config(Path(os.path.relpath(path, elsewhere)))
    assert config.data_dir == config_dir / "d"
    assert config.mesh.cert == config_dir / "c" / "a.key_secret"
    assert config.mesh.trusted == Path("/abs/t")


def test_relative_paths_from_command_line_resolve_against_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    monkeypatch.chdir(tmp_path)
    path = write(config_dir, '[node]\nname = "a"\n[mesh]\ncert = "c/a.key_secret"\n')
    config = load_config(
        path, {"mesh.cert": "mine.key_secret", "mesh.trusted": Path("keys"), "node.data_dir": "d"}
    )
    assert config.mesh.cert == tmp_path / "mine.key_secret"
    assert config.mesh.trusted == tmp_path / "keys"
    assert config.data_dir == tmp_path / "d"
    assert all(
        p is not None and p.is_absolute()
        for p in (config.mesh.cert, config.mesh.trusted, config.data_dir)
    )


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "key", "fragment"),
    [
        ('[node]\nname = "a"\n[mesh]\npeer = ["a:1"]\n', "mesh.peer", "did you mean mesh.peers?"),
        (
            '[node]\nname = "a"\n[mesh]\nheartbeat = 2\n',
            "mesh.heartbeat",
            "did you mean mesh.heartbeat_interval?",
        ),
        ('[node]\nname = "a"\n[mqt]\nlisten = "h:1"\n', "mqt", "did you mean [mqtt]?"),
        ('name = "a"\n', "name", "did you mean node.name?"),
        ('[node]\nname = "a"\n[mesh]\nname = "b"\n', "mesh.name", "did you mean node.name?"),
        ('[node]\nname = "a"\n[mesh]\nzzzz = 1\n', "mesh.zzzz", "unknown key"),
        ('[node]\nname = "a"\n[mesh.extra]\nx = 1\n', "mesh.extra", "unknown key"),
        ("node = 1\n", "node", "expected a table"),
    ],
)
def test_unknown_keys_name_file_and_key(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    path = write(tmp_path, text)
    err = error_of(path)
    assert (err.file, err.key) == (str(path), key)
    assert str(err).startswith(f"{path}: {key}: ")
    assert fragment in str(err)


@pytest.mark.parametrize(
    ("table_and_value", "key", "fragment"),
    [
        # wrong types
        ("[mqtt]\nmax_inflight = true", "mqtt.max_inflight", "expected an integer, got boolean"),
        ('[mqtt]\nmax_inflight = "20"', "mqtt.max_inflight", "expected an integer, got string"),
        ("[mqtt]\nmax_queued = 1.5", "mqtt.max_queued", "expected an integer, got float"),
        ("[mesh]\nheartbeat_interval = false", "mesh.heartbeat_interval", "expected a number"),
        ('[mesh]\npeers = "h:1"', "mesh.peers", "expected an array"),
        ("[mesh]\npeers = [1]", "mesh.peers", "item 0"),
        ("[mesh]\nlisten = 7100", "mesh.listen", "expected a string, got integer"),
        ("[mesh]\ncert = 1", "mesh.cert", "expected a string"),
        ('[mesh]\ncert = ""', "mesh.cert", "empty"),
        ("[log]\nlevel = 1", "log.level", "expected a string"),
        ("[mesh.listen]\nhost = 'x'", "mesh.listen", "expected a string, got a table"),
        # bad values
        ('[mesh]\nlisten = "127.0.0.1"', "mesh.listen", "missing port"),
        ('[mesh]\nlisten = "::1:7100"', "mesh.listen", "brackets"),
        ('[mesh]\nlisten = "127.0.0.1:70000"', "mesh.listen", "out of range"),
        ('[mesh]\nlisten = "127.0.0.1:x"', "mesh.listen", "not a number"),
        ('[mesh]\nlisten = ":7100"', "mesh.listen", "missing host"),
        ('[mesh]\nlisten = "10.0.0.256:1"', "mesh.listen", "not a valid IPv4"),
        ('[mqtt]\nlisten = "[zz::1]:1883"', "mqtt.listen", "not a valid IPv6"),
        ('[mesh]\npeers = ["h:1", "h:0"]', "mesh.peers", "item 1"),
        ('[mesh]\npeers = ["bad host:1"]', "mesh.peers", "item 0"),
        ('[mesh]\nadvertise_host = "a b"', "mesh.advertise_host", "not a valid host"),
        ("[mesh]\nheartbeat_interval = 0", "mesh.heartbeat_interval", "greater than 0"),
        ("[mesh]\nheartbeat_interval = -1.0", "mesh.heartbeat_interval", "greater than 0"),
        ("[mesh]\npeer_expiry = inf", "mesh.peer_expiry", "finite"),
        ("[mesh]\npeer_expiry = nan", "mesh.peer_expiry", "finite"),
        ("[mesh]\npeer_expiry = 0.5", "mesh.peer_expiry", "greater than mesh.heartbeat_interval"),
        (
            "[mesh]\nheartbeat_interval = 10",
            "mesh.heartbeat_interval",
            "greater than mesh.heartbeat_interval",
        ),
        ("[mqtt]\nmax_inflight = 0", "mqtt.max_inflight", "from 1 to 65535"),
        ("[mqtt]\nmax_packet_size = -5", "mqtt.max_packet_size", "must be from"),
        # issue 14's limits, Mosquitto's names
        ("[mqtt]\nmaximum_qos = 3", "mqtt.maximum_qos", "from 0 to 2"),
        ('[mqtt]\nretain_available = "no"', "mqtt.retain_available", "expected"),
        ("[mqtt]\nmax_keepalive = 65536", "mqtt.max_keepalive", "from 0 to 65535"),
        ("[mqtt]\nmax_connections = -2", "mqtt.max_connections", "from -1"),
        ("[mqtt]\nmax_queued_bytes = -1", "mqtt.max_queued_bytes", "must be from"),
        ("[mqtt]\nmax_queued_bytes_total = 1.5", "mqtt.max_queued_bytes_total", "expected an integer"),
        ("[mqtt]\nmax_subscriptions = -1", "mqtt.max_subscriptions", "must be from"),
        ("[mqtt]\nmessage_size_limit = 268435456", "mqtt.message_size_limit", "must be from"),
        ('[log]\nlevel = "loud"', "log.level", "debug, info, warning, error"),
    ],
)
def test_bad_values_name_file_and_key(
    tmp_path: Path, table_and_value: str, key: str, fragment: str
) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n' + table_and_value + "\n")
    err = error_of(path)
    assert (err.file, err.key) == (str(path), key), str(err)
    assert str(err).startswith(f"{path}: {key}: ")
    assert fragment in str(err)


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "a/b", "ünï"])
def test_bad_names(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, f'[node]\nname = "{name}"\n')
    err = error_of(path)
    assert (err.file, err.key) == (str(path), "node.name")


def test_missing_name(tmp_path: Path) -> None:
    path = write(tmp_path, '[mesh]\nlisten = "127.0.0.1:1"\n')
    err = error_of(path)
    assert (err.file, err.key) == (str(path), "node.name")
    assert "required" in str(err)
    assert error_of(None).key == "node.name"


def test_toml_syntax_error_gives_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n\n[mesh\nlisten = "h:1"\n')
    err = error_of(path)
    assert err.file == str(path)
    assert str(err).startswith(f"{path}: TOML syntax error: ")
    assert "line 4" in str(err) and "column" in str(err)


def test_missing_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    err = error_of(missing)
    assert err.file == str(missing) and "not found" in str(err)

    assert "directory" in str(error_of(tmp_path))

    binary = tmp_path / "bin.toml"
    binary.write_bytes(b'[node]\nname = "\xff"\n')
    err = error_of(binary)
    assert err.file == str(binary) and "UTF-8" in str(err)


def test_command_line_errors_name_the_command_line(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n')
    cases = [
        ({"node.nam": "b"}, "node.nam", "did you mean node.name?"),
        ({"mqtt.listen": "nonsense"}, "mqtt.listen", "missing port"),
        ({"mesh.heartbeat_interval": "fast"}, "mesh.heartbeat_interval", "expected a number"),
        ({"mesh.peer_expiry": "0.5"}, "mesh.peer_expiry", "greater than"),
        ({"mqtt.max_inflight": "many"}, "mqtt.max_inflight", "expected an integer"),
        ({"log.level": "loud"}, "log.level", "log level"),
        ({"node.name": None}, "node.name", "expected a string"),
        ({"mesh.peers": ["h:1", "::1"]}, "mesh.peers", "item 1"),
    ]
    for overrides, key, fragment in cases:
        err = error_of(path, overrides)
        assert (err.file, err.key) == ("<command line>", key), str(err)
        assert str(err).startswith(f"<command line>: {key}: ")
        assert fragment in str(err), str(err)


def test_cross_check_blames_the_file_when_the_file_is_wrong(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n[mesh]\npeer_expiry = 3\n')
    err = error_of(path, {"mesh.heartbeat_interval": "4"})
    # peer_expiry was given in the file; the file's value is what is inconsistent now.
    assert (err.file, err.key) == (str(path), "mesh.peer_expiry")


# ---------------------------------------------------------------------------- parse_hostport


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:7100", ("127.0.0.1", 7100)),
        ("localhost:0", ("localhost", 0)),
        ("node-1.mesh.svc.cluster.local:65535", ("node-1.mesh.svc.cluster.local", 65535)),
        ("[::1]:7100", ("::1", 7100)),
        ("[::]:1", ("::", 1)),
        ("[fe80::1%eth0]:5", ("fe80::1%eth0", 5)),
    ],
)
def test_parse_hostport_good(text: str, expected: tuple[str, int]) -> None:
    assert parse_hostport(text) == expected


def test_parse_hostport_default_port() -> None:
    assert parse_hostport("example.org", 1883) == ("example.org", 1883)
    assert parse_hostport("[::1]", 1883) == ("::1", 1883)
    assert parse_hostport("example.org:1", 1883) == ("example.org", 1)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "host",
        ":1",
        "host:",
        "host:-1",
        "host:+1",
        "host:1_0",
        "host:65536",
        "host:١٢",
        " host:1",
        "::1",
        "[::1",
        "[::1]x",
        "[host]:1",
        "a b:1",
        "host:1:2",
        "[::1]:",
    ],
)
def test_parse_hostport_bad(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_hostport(text)
    assert repr(text) in str(info.value) or text == ""


def test_parse_hostport_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        parse_hostport(7100)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- fuzz

_VALID_FRAGMENTS = st.sampled_from(
    [
        "[node]\n",
        'name = "a"\n',
        "[mesh]\n",
        "[mqtt]\n",
        "[log]\n",
        'listen = "127.0.0.1:1"\n',
        "peers = [",
        '"h:1"',
        "]\n",
        "heartbeat_interval = 0.5\n",
        "peer_expiry = 1e400\n",
        'level = "info"\n',
        "max_inflight = 3\n",
        'cert = "x"\n',
        "[[node]]\n",
        "x = {a=1}\n",
        "= \n",
        '"\\u0000"',
        "'''",
        "\n",
        "[",
        "]",
        "1979-05-27T07:32:00Z",
        "inf",
        "-0",
        "0x10",
    ]
)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.one_of(st.text(), st.lists(_VALID_FRAGMENTS, max_size=20).map("".join)))
def test_arbitrary_text_loads_or_raises_config_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fuzz.toml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        config = load_config(path)
    except ConfigError as err:
        assert err.file == str(path)
        assert str(err).startswith(f"{path}: ")
    else:
        assert isinstance(config, NodeConfig)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            ["node.name", "mesh.peers", "mqtt.max_inflight", "mesh.cert", "log.level", "bogus"]
        ),
        st.one_of(
            st.none(),
            st.text(max_size=10),
            st.integers(),
            st.lists(st.text(max_size=5), max_size=3),
        ),
    )
)
def test_arbitrary_overrides_load_or_raise_config_error(overrides: dict) -> None:
    try:
        load_config(None, overrides)
    except ConfigError as err:
        assert err.file == "<command line>"


def test_discovery_modes_from_file_and_command_line(tmp_path) -> None:
    from zmesh.config import ConfigError, load_config

    conf = tmp_path / "n.toml"
    conf.write_text('[node]\nname = "n"\n[discovery]\nmode = ["mdns", "static"]\ninterface = "eth0"\n')
    config = load_config(conf)
    assert config.discovery.mode == ("mdns", "static") and config.discovery.interface == "eth0"
    config = load_config(conf, {"discovery.mode": ["dns"], "discovery.dns_name": "zmesh.ns.svc.cluster.local"})
    assert config.discovery.mode == ("dns",) and config.discovery.dns_name == "zmesh.ns.svc.cluster.local"
    assert load_config(None, {"node.name": "n"}).discovery.mode == ("static",)
    with pytest.raises(ConfigError, match=r"discovery.dns_name: required"):
        load_config(None, {"node.name": "n", "discovery.mode": "dns"})
    with pytest.raises(ConfigError, match=r"discovery.mode: 'carrier-pigeon' is not a discovery mode"):
        load_config(None, {"node.name": "n", "discovery.mode": "carrier-pigeon"})
    with pytest.raises(ConfigError, match=r"mesh.peer_evasive: must be less than"):
        load_config(None, {"node.name": "n", "mesh.peer_evasive": "6"})


def test_mesh_policy_keeps_rule_order(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n[mesh.policy]\n"scanner-*" = ["scans/#"]\n"*" = []\n')
    assert load_config(path).mesh.policy == (("scanner-*", ("scans/#",)), ("*", ()))


@pytest.mark.parametrize(
    "body, message",
    [
        ('[mesh]\npolicy = ["scans/#"]', "expected a table of peer name patterns"),
        ('[mesh.policy]\n"scanner-*" = "scans/#"', "expected an array of topic filters"),
        ('[mesh.policy]\n"scanner-*" = ["scans/#/x"]', "'#' must be the last level"),
    ],
)
def test_bad_mesh_policy_names_the_key(tmp_path: Path, body: str, message: str) -> None:
    error = error_of(write(tmp_path, f'[node]\nname = "a"\n{body}\n'))
    assert error.key == "mesh.policy" and message in str(error)


# ---------------------------------------------------------------------------- users and ACLs


def test_auth_defaults_are_off() -> None:
    mqtt = load_config(None, {"node.name": "a"}).mqtt
    assert (mqtt.password_file, mqtt.acl_file, mqtt.allow_anonymous) == (None, None, None)


def test_auth_files_resolve_against_the_config_directory(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[node]\nname = "a"\n[mqtt]\npassword_file = "auth/passwd"\nacl_file = "/etc/zmesh/acl"\n'
        "allow_anonymous = true\n",
    )
    mqtt = load_config(path).mqtt
    assert mqtt.password_file == tmp_path / "auth" / "passwd"
    assert mqtt.acl_file == Path("/etc/zmesh/acl")
    assert mqtt.allow_anonymous is True


def test_allow_anonymous_from_the_command_line_and_unset() -> None:
    assert load_config(None, {"node.name": "a", "mqtt.allow_anonymous": "false"}).mqtt.allow_anonymous is False
    assert load_config(None, {"node.name": "a", "mqtt.allow_anonymous": "yes"}).mqtt.allow_anonymous is True
    assert load_config(None, {"node.name": "a", "mqtt.allow_anonymous": None}).mqtt.allow_anonymous is None


@pytest.mark.parametrize(
    ("value", "key", "fragment"),
    [
        ('allow_anonymous = "false"', "mqtt.allow_anonymous", "expected true or false, got string"),
        ("allow_anonymous = 1", "mqtt.allow_anonymous", "expected true or false, got integer"),
        ("password_file = 1", "mqtt.password_file", "expected a string"),
        ('password_file = ""', "mqtt.password_file", "empty"),
        ('acl_file = ["a"]', "mqtt.acl_file", "expected a string, got array"),
        ('acl_files = "a"', "mqtt.acl_files", "did you mean mqtt.acl_file?"),
    ],
)
def test_bad_auth_values_name_file_and_key(tmp_path: Path, value: str, key: str, fragment: str) -> None:
    path = write(tmp_path, f'[node]\nname = "a"\n[mqtt]\n{value}\n')
    err = error_of(path)
    assert (err.file, err.key) == (str(path), key), str(err)
    assert fragment in str(err)


# ---------------------------------------------------------------------------- MQTT listeners

LISTENERS = """
[node]
name = "a"

[[mqtt.listeners]]
address = "0.0.0.0:8883"
certfile = "tls/server.pem"
keyfile = "/etc/zmesh/server.key"
cafile = "tls/ca.pem"
require_certificate = true
use_identity_as_username = true
tls_version = "tlsv1.3"
ciphers = "ECDHE+AESGCM"

[[mqtt.listeners]]
address = "[::1]:8080"
protocol = "websockets"
"""


def test_listeners_parse_with_mosquitto_names_and_file_relative_paths(tmp_path: Path) -> None:
    from zmesh.config import ListenerConfig

    mqtt = load_config(write(tmp_path, LISTENERS)).mqtt
    tls, ws = mqtt.listeners
    assert tls == ListenerConfig(
        address="0.0.0.0:8883",
        certfile=tmp_path / "tls" / "server.pem",
        keyfile=Path("/etc/zmesh/server.key"),
        cafile=tmp_path / "tls" / "ca.pem",
        require_certificate=True,
        use_identity_as_username=True,
        tls_version="tlsv1.3",
        ciphers="ECDHE+AESGCM",
    )
    assert (tls.key, tls.scheme, tls.tls) == ("mqtt.listeners[0]", "mqtts", True)
    assert (ws.address, ws.protocol, ws.scheme, ws.tls, ws.tls_version) == ("[::1]:8080", "websockets", "ws", False, "tlsv1.2")
    # Listeners replace the default plain listener unless mqtt.listen is set explicitly.
    assert mqtt.listen is None and mqtt.all_listeners == (tls, ws)


def test_explicit_listen_stays_first_beside_listeners(tmp_path: Path) -> None:
    path = write(tmp_path, LISTENERS.replace("[[mqtt.listeners]]", '[mqtt]\nlisten = "127.0.0.1:1883"\n[[mqtt.listeners]]', 1))
    mqtt = load_config(path).mqtt
    assert [(x.key, x.address, x.scheme) for x in mqtt.all_listeners] == [
        ("mqtt.listen", "127.0.0.1:1883", "mqtt"),
        ("mqtt.listeners[0]", "0.0.0.0:8883", "mqtts"),
        ("mqtt.listeners[1]", "[::1]:8080", "ws"),
    ]
    # --mqtt on the command line keeps the plain listener next to the file's listeners.
    cli = load_config(write(tmp_path, LISTENERS), {"mqtt.listen": "127.0.0.1:0"}).mqtt
    assert [x.key for x in cli.all_listeners] == ["mqtt.listen", "mqtt.listeners[0]", "mqtt.listeners[1]"]
    # Without listeners nothing changes: the default plain listener.
    assert [x.address for x in load_config(None, {"node.name": "a"}).mqtt.all_listeners] == ["127.0.0.1:1883"]


def test_listeners_from_the_python_api_resolve_against_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mqtt = load_config(None, {"node.name": "a", "mqtt.listeners": [
        {"address": "127.0.0.1:0", "certfile": "s.pem", "keyfile": "s.key"},
    ]}).mqtt
    assert mqtt.listeners[0].certfile == tmp_path / "s.pem"


@pytest.mark.parametrize(
    ("entries", "key", "fragment"),
    [
        ('[[mqtt.listeners]]\nprotocol = "mqtt"', "mqtt.listeners[0].address", "required"),
        ('[[mqtt.listeners]]\naddress = "127.0.0.1"', "mqtt.listeners[0].address", "missing port"),
        ('[[mqtt.listeners]]\naddress = "h:1"\nprotocol = "ws"', "mqtt.listeners[0].protocol", 'did you mean "websockets"'),
        ('[[mqtt.listeners]]\naddress = "h:1"\nprotocol = "mqtts"', "mqtt.listeners[0].protocol", "TLS comes from certfile"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncertfile = "c"', "mqtt.listeners[0].keyfile", "required with certfile"),
        ('[[mqtt.listeners]]\naddress = "h:1"\nkeyfile = "k"', "mqtt.listeners[0].certfile", "required with keyfile"),
        ('[[mqtt.listeners]]\naddress = "h:1"\n[[mqtt.listeners]]\naddress = "h:2"\ncertfile = "c"',
         "mqtt.listeners[1].keyfile", "TLS needs both"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncafile = "ca"', "mqtt.listeners[0].cafile", "needs TLS"),
        ('[[mqtt.listeners]]\naddress = "h:1"\nrequire_certificate = true', "mqtt.listeners[0].require_certificate", "needs TLS"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncertfile = "c"\nkeyfile = "k"\nrequire_certificate = true',
         "mqtt.listeners[0].require_certificate", "needs cafile or capath"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncertfile = "c"\nkeyfile = "k"\nuse_identity_as_username = true',
         "mqtt.listeners[0].use_identity_as_username", "needs require_certificate"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncertfile = "c"\nkeyfile = "k"\nrequire_certificate = "yes"\ncafile = "a"',
         "mqtt.listeners[0].require_certificate", "expected true or false, got string"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncertfile = "c"\nkeyfile = "k"\ntls_version = "tlsv1.1"',
         "mqtt.listeners[0].tls_version", "older than 1.2"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncertfile = "c"\nkeyfile = "k"\ntls_version = "tls1.3"',
         "mqtt.listeners[0].tls_version", "tlsv1.2 or tlsv1.3"),
        ('[[mqtt.listeners]]\naddress = "h:1"\ncerfile = "c"', "mqtt.listeners[0].cerfile", "did you mean certfile?"),
        ('[[mqtt.listeners]]\naddress = "h:1"\nport = 8883', "mqtt.listeners[0].port", 'address = "HOST:PORT"'),
        ('[[mqtt.listeners]]\naddress = "h:1"\n[[mqtt.listeners]]\naddress = "h:1"',
         "mqtt.listeners[1].address", "already used by mqtt.listeners[0]"),
        ('[mqtt]\nlisten = "h:1"\n[[mqtt.listeners]]\naddress = "h:1"',
         "mqtt.listeners[0].address", "already used by mqtt.listen"),
        ('[mqtt]\nlisteners = "h:1"', "mqtt.listeners", "array of tables"),
        ('[mqtt]\nlisteners = ["h:1"]', "mqtt.listeners[0]", "expected a table"),
    ],
)
def test_bad_listeners_name_file_entry_and_key(tmp_path: Path, entries: str, key: str, fragment: str) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n' + entries + "\n")
    err = error_of(path)
    assert (err.file, err.key) == (str(path), key), str(err)
    assert str(err).startswith(f"{path}: {key}: ")
    assert fragment in str(err), str(err)


def test_port_zero_listeners_never_clash(tmp_path: Path) -> None:
    path = write(tmp_path, '[node]\nname = "a"\n[mqtt]\nlisten = "h:0"\n'
                 '[[mqtt.listeners]]\naddress = "h:0"\n[[mqtt.listeners]]\naddress = "h:0"\nprotocol = "websockets"\n')
    assert len(load_config(path).mqtt.all_listeners) == 3


_LISTENER_VALUES = st.one_of(
    st.sampled_from(["127.0.0.1:0", "h:1", "[::1]:8883", "mqtt", "websockets", "tlsv1.2", "tlsv1.3", "c.pem", ""]),
    st.booleans(), st.integers(-2, 70000), st.text(max_size=12), st.lists(st.integers(), max_size=2),
)
_LISTENER_TABLES = st.dictionaries(
    st.sampled_from(["address", "protocol", "certfile", "keyfile", "cafile", "capath", "require_certificate",
                     "use_identity_as_username", "tls_version", "ciphers", "port", "x"]),
    _LISTENER_VALUES, max_size=8,
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.lists(_LISTENER_TABLES, max_size=3), _LISTENER_VALUES))
def test_any_listeners_value_loads_or_gives_a_config_error_naming_it(value: object) -> None:
    try:
        mqtt = load_config(None, {"node.name": "a", "mqtt.listeners": value}).mqtt
    except ConfigError as err:
        assert err.file == "<command line>" and err.key.startswith("mqtt.listeners"), str(err)
        return
    for listener in mqtt.listeners:  # what loads is consistent
        assert (listener.certfile is None) == (listener.keyfile is None)
        assert not listener.use_identity_as_username or listener.require_certificate
        assert not listener.require_certificate or listener.cafile or listener.capath


def test_certificate_mode_needs_exactly_one_way_to_prove_itself(tmp_path: Path) -> None:
    conf = tmp_path / "n.toml"
    conf.write_text('[node]\nname = "n"\n[mesh]\nauthority = "ca.pub"\n')
    with pytest.raises(ConfigError, match="mesh.authority: a node admitted by certificate needs exactly one"):
        load_config(conf)
    conf.write_text('[node]\nname = "n"\n[mesh]\nauthority = "ca.pub"\ncertificate = "n.chain"\n')
    with pytest.raises(ConfigError, match="mesh.certificate: a hand-issued certificate is for a fixed key"):
        load_config(conf)
    conf.write_text('[node]\nname = "n"\n[mesh]\nsigner = "g.signer"\n')
    with pytest.raises(ConfigError, match="mesh.signer: only meaningful with mesh.authority"):
        load_config(conf)
    conf.write_text('[node]\nname = "n"\n[mesh]\nauthority = "ca.pub"\nsigner = "g.signer"\ngroups = ["a b"]\n')
    with pytest.raises(ConfigError, match="mesh.groups"):
        load_config(conf)
    conf.write_text('[node]\nname = "n"\n[mesh]\nauthority = "ca.pub"\nsigner = "g.signer"\ngroups = ["scanner"]\n')
    config = load_config(conf)
    assert config.mesh.signer == tmp_path / "g.signer" and config.mesh.groups == ("scanner",)


def test_fixed_mesh_ports_http_and_shutdown_grace(tmp_path: Path) -> None:
    """Off or ephemeral by default, as before; set, they are what the node binds."""
    config = load_config(write(tmp_path, '[node]\nname = "a"\n'))
    assert (config.mesh.events_port, config.mesh.jobs_port, config.http.listen) == (0, 0, None)
    assert 0 < config.shutdown_grace < 30  # inside Kubernetes' default termination grace
    config = load_config(write(tmp_path, """
[node]
name = "a"
shutdown_grace = 5
[mesh]
listen = "0.0.0.0:7100"
events_port = 7101
jobs_port = 7102
[http]
listen = "0.0.0.0:7180"
"""))
    assert (config.mesh.events_port, config.mesh.jobs_port) == (7101, 7102)
    assert config.http.listen == "0.0.0.0:7180" and config.shutdown_grace == 5.0
    assert load_config(None, {"node.name": "a", "http.listen": ""}).http.listen is None


@pytest.mark.parametrize(
    "text, key, fragment",
    [
        ('[mesh]\nlisten = "0.0.0.0:7100"\nevents_port = 7100', "mesh.events_port", "already used by mesh.listen"),
        ("[mesh]\nevents_port = 7101\njobs_port = 7101", "mesh.jobs_port", "already used by mesh.events_port"),
        ("[mesh]\njobs_port = 70000", "mesh.jobs_port", "from 0 to 65535"),
        ('[mesh]\nlisten = "0.0.0.0:7100"\nauthority = "ca.pub"\nsigner = "g.signer"\nevents_port = 7101',
         "mesh.events_port", "already used by mesh.identity_port"),
        ('[mesh]\nevents_port = "7101"', "mesh.events_port", "expected an integer"),
        ('[node]\nname = "a"\nshutdown_grace = 0', "node.shutdown_grace", "greater than 0"),
        ('[http]\nlisten = "nowhere"', "http.listen", "port"),
    ],
)
def test_bad_ops_settings(tmp_path: Path, text: str, key: str, fragment: str) -> None:
    err = error_of(write(tmp_path, text if text.startswith("[node]") else '[node]\nname = "a"\n' + text))
    assert err.key == key and fragment in err.message, str(err)


# ---------------------------------------------------------------------------- hostile peers (issue 14)


def test_peer_input_bounds_have_defaults_and_checked_values(tmp_path: Path) -> None:
    from zmesh.config import mesh_max_message_size

    config = load_config(None, {"node.name": "a"})
    assert (config.retained.max_entries, config.retained.max_bytes) == (200_000, 256 * 1024 * 1024)
    assert config.retained.max_clock_offset == 60.0
    assert mesh_max_message_size(config) == 16 * 1024 * 1024  # derived: 2 x 1 MiB + 2 MiB < 16 MiB
    big = load_config(write(tmp_path, '[node]\nname = "a"\n[mqtt]\nmax_packet_size = 10485760\n'))
    assert mesh_max_message_size(big) == 2 * 10_485_760 + 2 * 1024 * 1024
    set_ = load_config(write(tmp_path, '[node]\nname = "a"\n[mesh]\nmax_message_size = 5000000\n', "b.toml"))
    assert mesh_max_message_size(set_) == 5_000_000
    for text, key in (('[mesh]\nmax_message_size = -1', "mesh.max_message_size"),
                      ('[retained]\nmax_clock_offset = 0', "retained.max_clock_offset"),
                      ('[retained]\nsync_bytes_per_second = 10', "retained.sync_bytes_per_second"),
                      ('[retained]\nsync_requests_per_second = "x"', "retained.sync_requests_per_second")):
        err = error_of(write(tmp_path, f'[node]\nname = "a"\n{text}\n', "bad.toml"))
        assert err.key == key


def test_delivery_table(tmp_path: Path) -> None:
    """[delivery] (docs/delivery.md §11): defaults, values, and errors naming file and key."""
    assert load_config(write(tmp_path, '[node]\nname = "a"\n')).delivery.policy == "block"
    config = load_config(write(tmp_path, '[node]\nname = "a"\n[delivery]\npolicy = "drop"\noutbox_max_bytes = 1048576\n'
                                         'outbox_max_age = 30\nblock_max = 5\ngive_up = 45\nstop_timeout = 0\n'))
    d = config.delivery
    assert (d.policy, d.outbox_max_bytes, d.outbox_max_age, d.block_max, d.give_up, d.stop_timeout) == (
        "drop", 1048576, 30.0, 5.0, 45.0, 0.0)
    path = write(tmp_path, '[node]\nname = "a"\n[delivery]\npolicy = "fast"\n')
    with pytest.raises(ConfigError, match=rf"{path}: delivery.policy: must be one of 'block', 'drop'"):
        load_config(path)
    path = write(tmp_path, '[node]\nname = "a"\n[delivery]\nblock_max = 60\n')
    with pytest.raises(ConfigError, match=rf"{path}: delivery.block_max: .*less than delivery.outbox_max_age"):
        load_config(path)
    path = write(tmp_path, '[node]\nname = "a"\n[delivery]\noutbox_max_age = 100\n')
    with pytest.raises(ConfigError, match=rf"{path}: delivery.outbox_max_age: delivery.give_up must be greater"):
        load_config(path)
    path = write(tmp_path, '[node]\nname = "a"\n[delivery]\nwindow = 0\n')
    with pytest.raises(ConfigError, match=rf"{path}: delivery.window: must be from 1"):
        load_config(path)
