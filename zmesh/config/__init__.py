"""Node configuration: TOML text to frozen dataclasses.

Three rooms, re-exported here: ``model`` (the dataclasses and ``ConfigError``), ``values``
(the checkers of single values) and ``loader`` (the schema and ``load_config``).

Pure apart from reading the one file it is given: no sockets, no asyncio, and no checks that
paths exist (that is the caller's business when it opens them, and keeps this testable).

Every error is a ``ConfigError`` whose message reads ``<file>: <dotted.key>: <what is wrong>``
so that an operator can go straight to the line. Values given on the command line (the
``overrides`` mapping) are reported as coming from ``<command line>``. Unknown keys are errors,
not warnings: a misspelt ``peer_expiry`` silently falling back to its default is exactly the
kind of mistake that costs an afternoon.

Layout::

    [node]  name, data_dir, shutdown_grace
    [mesh]  listen, events_port, jobs_port, cert, trusted, peers, heartbeat_interval,
            peer_expiry, advertise_host, policy, authority, signer, certificate, groups,
            revocations, identity_port, max_message_size
    [mqtt]  listen, max_packet_size, max_inflight, max_queued, password_file, acl_file,
            allow_anonymous, max_sessions, persistent_client_expiration, topic_alias_maximum,
            max_keepalive, max_connections, message_size_limit, max_subscriptions,
            max_queued_bytes, max_queued_bytes_total, retain_available, maximum_qos
    [[mqtt.listeners]] address, protocol, certfile, keyfile, cafile, capath,
            require_certificate, use_identity_as_username, tls_version, ciphers
    [discovery] mode, interface, dns_name, dns_port, dns_interval
    [retained] max_entries, max_bytes, tombstone_ttl, anti_entropy_interval, max_clock_offset,
            sync_requests_per_second, sync_bytes_per_second
    [store] sync, sync_interval, key_file, previous_key_files
    [jobs]  lease, max_attempts
    [http]  listen
    [log]   level
"""

from __future__ import annotations

from zmesh.config.loader import (  # noqa: F401
    load_config,
)
from zmesh.config.model import (  # noqa: F401
    COMMAND_LINE,
    DEFAULTS,
    DISCOVERY_MODES,
    LISTENER_PROTOCOLS,
    LOG_LEVELS,
    MQTT_MAX_PACKET,
    NAME_RE,
    STORE_SYNC_MODES,
    TLS_VERSIONS,
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
    mesh_max_message_size,
)
from zmesh.config.values import (  # noqa: F401
    parse_hostport,
    parse_seed,
)
