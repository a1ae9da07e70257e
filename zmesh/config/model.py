"""The configuration as values: frozen dataclasses per table, their defaults, and
``ConfigError``. Pure: no I/O.

What the rest of zmesh reads; ``zmesh.config.loader`` builds them from TOML.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

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
    # The event (PUB) and job (PULL) sockets bind on listen's host; 0 is a fresh port at each
    # start (peers learn it from the hello). Fixed ports are for firewalls and NetworkPolicies.
    events_port: int = 0
    jobs_port: int = 0
    cert: Path | None = None  # this node's NAME.key_secret
    trusted: Path | None = None  # directory of trusted *.key files (default: cert's directory)
    peers: tuple[str, ...] = ()  # seed peers, HOST:PORT
    heartbeat_interval: float = 1.0
    peer_expiry: float = 5.0
    peer_evasive: float | None = None  # silence after which a peer shows as evasive (default: expiry / 2)
    advertise_host: str | None = None  # host other nodes use to reach us when listen is 0.0.0.0
    # [mesh.policy]: peer name glob (or "key:<z85>") -> topic filters it may publish to
    policy: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # A mesh authority (docs/identity.md): members are admitted by certificate. ``authority``
    # is the file of its public keys; a node proves itself with a chain it issues itself
    # from ``signer`` (a group's signer file) or a hand-issued ``certificate`` for its
    # ``cert``. Without ``cert`` the node makes a new CURVE key pair at every start.
    authority: Path | None = None
    signer: Path | None = None
    certificate: Path | None = None
    groups: tuple[str, ...] = ()
    revocations: Path | None = None  # a revocation list to start from
    identity_port: int = 0  # where "who are you" is answered (0: control port + 1)
    # Largest ZeroMQ message a peer may send us (ZMQ_MAXMSGSIZE on every mesh socket; a
    # larger one cuts that connection). 0: derived from mqtt.max_packet_size, see
    # mesh_max_message_size().
    max_message_size: int = 0


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
    # Resource limits a hostile client meets (issue 14), with Mosquitto's names and meaning
    # where Mosquitto has the concept (README: the migration table says where they differ).
    max_keepalive: int = 65535  # MQTT 5: Server Keep Alive for a client asking more (or 0)
    max_connections: int = 10_000  # client connections, all listeners together; -1 or 0: no limit
    message_size_limit: int = 0  # largest PUBLISH payload accepted (0: max_packet_size decides)
    max_subscriptions: int = 1_000  # per client (no Mosquitto equivalent); 0: no limit
    max_queued_bytes: int = 16 * 1024 * 1024  # per client: payload bytes queued beyond max_inflight
    max_queued_bytes_total: int = 256 * 1024 * 1024  # node-wide: QoS 1/2 bytes held for clients
    retain_available: bool = True  # false: a PUBLISH or will with retain set is refused
    maximum_qos: int = 2  # highest QoS granted and accepted
    # More listeners (TLS, WebSocket). When any are given, `listen` is off unless it is set
    # explicitly, as a `listener` line in mosquitto.conf replaces Mosquitto's default one.
    listeners: tuple[ListenerConfig, ...] = ()
    # Mosquitto-format users and ACLs (zmesh.security). allow_anonymous None: allowed exactly
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
    # Live retained topics per node, and their payload bytes (0: unlimited). Bounded by
    # default: every node holds the mesh's whole retained state, so one client retaining
    # without end would fill every node's memory.
    max_entries: int = 200_000
    max_bytes: int = 256 * 1024 * 1024
    tombstone_ttl: float = 86_400.0  # seconds a delete is remembered against stale copies
    anti_entropy_interval: float = 30.0  # seconds between digest comparisons, each with one random member
    # A peer's timestamp more than this many seconds ahead of our wall clock is refused
    # (zmesh.retained.hlc; CockroachDB's max offset).
    max_clock_offset: float = 60.0
    # What one peer may fetch from us by anti-entropy (token buckets per peer key): sync
    # requests per second (a burst of 10x), and answer bytes per second (a burst of 4 s).
    sync_requests_per_second: float = 2.0
    sync_bytes_per_second: int = 4 * 1024 * 1024


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


DELIVERY_POLICIES = ("block", "drop")


@dataclass(frozen=True)
class DeliveryConfig:
    """Reliable QoS >= 1 delivery across nodes (docs/delivery.md §11)."""

    policy: str = "block"  # "block": hold PUBACK/PUBREC until the outbox has room; "drop": evict the oldest
    outbox_max_bytes: int = 64 * 1024 * 1024  # the outbox log's bound
    outbox_max_age: float = 60.0  # seconds a destination's unacknowledged message is kept
    backfill_window: float = 2.0  # seconds an acknowledged message stays for late interest
    backfill_max_bytes: int = 8 * 1024 * 1024  # ... unless the outbox holds more than this
    # Messages unacknowledged per destination: at most this many in flight (credit), and
    # under `block` publishers are held while a destination has more than this waiting.
    window: int = 128
    window_bytes: int = 8 * 1024 * 1024
    # Messages queued for one online MQTT session (beyond its in-flight ones) past which
    # the node stops taking QoS >= 1 stream input: its origins then hold their publishers.
    session_backlog: int = 64
    block_max: float = 10.0  # a destination silent this long is detached; < outbox_max_age
    stop_timeout: float = 5.0  # bounded wait for acknowledgements on stop
    reorder_buffer: int = 4096  # the receiver's buffer per origin, messages
    reorder_buffer_bytes: int = 8 * 1024 * 1024
    give_up: float = 90.0  # an unanswered hole is reported and skipped; > outbox_max_age


@dataclass(frozen=True)
class HttpConfig:
    # /healthz, /readyz and /metrics (zmesh.ops); None: off (a plain host needs none of it)
    listen: str | None = None


@dataclass(frozen=True)
class LogConfig:
    level: str = "info"  # debug | info | warning | error


@dataclass(frozen=True)
class NodeConfig:
    name: str
    data_dir: Path | None = None
    # Seconds SIGTERM may take to drain (clients told, jobs handed back, peers told goodbye)
    # before the node stops anyway; under Kubernetes' default 30 s termination grace.
    shutdown_grace: float = 20.0
    mesh: MeshConfig = field(default_factory=MeshConfig)
    mqtt: MqttConfig = field(default_factory=MqttConfig)
    log: LogConfig = field(default_factory=LogConfig)
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    retained: RetainedConfig = field(default_factory=RetainedConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    jobs: JobsConfig = field(default_factory=JobsConfig)
    http: HttpConfig = field(default_factory=HttpConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    source: str = DEFAULTS  # the config file this came from, for error messages downstream
    # Dotted key -> where its value came from (the file, or COMMAND_LINE for a flag or the
    # Python API): checks made at start (a seed's key against the ring) blame the right one.
    origins: dict[str, str] = field(default_factory=dict, compare=False, repr=False)


def mesh_max_message_size(config: NodeConfig) -> int:
    """``mesh.max_message_size``, or when 0 the default derived from what a legitimate
    frame can hold: a batch is flushed past 256 KiB of payloads (events, retained, jobs,
    sync chunks), so it holds that, one more message of up to ``mqtt.max_packet_size``
    (with topic and properties, at most one more packet size), and its framing; 16 MiB at
    the least. Every node of a mesh should allow the largest packet size any node allows."""
    if config.mesh.max_message_size:
        return config.mesh.max_message_size
    return max(16 * 1024 * 1024, 2 * config.mqtt.max_packet_size + 2 * 1024 * 1024)
