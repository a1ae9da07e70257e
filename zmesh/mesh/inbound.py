"""What a peer sends, checked as strictly as what an MQTT client sends. Pure.

A trusted key proves who a peer is, not that it is well: a compromised pod holds one. So a
topic, a property block, a node name or an address from a peer passes the same rules as a
client's PUBLISH (``zmesh.topics``, the MQTT 5 property table) before anything is stored,
delivered or dialled. ``wire`` checks the shapes (types, lengths); this module checks the
meaning. Each check raises ``Refused`` with the drop reason the caller counts it under
(``zmesh.drops``); the message may quote the peer's value, cut short.

May import: the standard library, the ground floor (``topics``) and ``mqtt.properties``
(pure). Imported by ``mesh.wire`` (hellos) and ``mesh.mesh`` (events, retained, sync).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

from zmesh.mqtt.properties import encode_properties
from zmesh.topics import TopicError, validate_topic_filter, validate_topic_name

BAD_TOPIC = "mesh_bad_topic"
BAD_PROPERTIES = "mesh_bad_properties"
BAD_ORIGIN = "mesh_bad_origin"
BAD_HELLO = "mesh_bad_hello"
BAD_TIMESTAMP = "mesh_bad_timestamp"

# Node names, as zmesh.config allows them.
_NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
# RFC 1123 host names (and "_", which service names use): what a hello's host may be when
# it is not an IP address. ZeroMQ is handed nothing else to dial.
_HOST_RE = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,62})(?:\.[A-Za-z0-9_-]{1,63})*\.?")
_KEY_RE = re.compile(r"[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}")  # a Z85 CURVE public key
_U32 = 1 << 32

# The properties a message may carry between nodes: those of a PUBLISH that make sense to a
# receiver. Topic Alias and Subscription Identifier are per connection and per subscriber;
# the node strips them before anything reaches the mesh.
_MESSAGE_PROPERTIES = frozenset({
    "payload_format_indicator", "message_expiry_interval", "content_type",
    "response_topic", "correlation_data", "user_property",
})
MAX_PROPERTY_BYTES = 256 * 1024  # a generous bound on one message's property block


class Refused(ValueError):
    """Peer input refused; ``reason`` is the drop reason to count it under."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _quote(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_topic(topic: str) -> None:
    """A topic name a peer may publish to the mesh: valid as a client's PUBLISH topic, and
    none that never leaves a node (``$SYS`` is node-local, and ``$jobs/`` topics but the
    dead letters are carried as jobs, never as messages): the node's own rule for what it
    sends (``Node._topic``), applied to what it receives."""
    try:
        validate_topic_name(topic)
    except TopicError as exc:
        raise Refused(BAD_TOPIC, str(exc)) from None
    if topic[:1] == "$" and (
        topic == "$SYS" or topic.startswith("$SYS/")
        or (topic.startswith("$jobs/") and not topic.startswith("$jobs/dead/"))
    ):
        raise Refused(BAD_TOPIC, f"topic {_quote(topic)} is node-local")


def check_properties(properties: dict[str, Any] | None) -> dict[str, Any] | None:
    """The MQTT 5 properties of a message from a peer, checked as a client's would be and
    normalised (user properties as tuples); None or {} give None. Raises Refused."""
    if not properties:
        return None
    out: dict[str, Any] = {}
    for name, value in properties.items():
        if name not in _MESSAGE_PROPERTIES:
            raise Refused(BAD_PROPERTIES, f"property {_quote(name)} may not travel with a message")
        if name == "payload_format_indicator":
            ok = value in (0, 1) and type(value) is int
        elif name == "message_expiry_interval":
            ok = type(value) is int and 0 <= value < _U32
        elif name == "correlation_data":
            ok = type(value) is bytes and len(value) <= 0xFFFF
        elif name == "user_property":
            ok = type(value) is list and all(
                type(pair) in (list, tuple) and len(pair) == 2 and _is_mqtt_string(pair[0]) and _is_mqtt_string(pair[1])
                for pair in value
            )
            if ok:
                value = [(pair[0], pair[1]) for pair in value]
        elif name == "response_topic":
            ok = _is_mqtt_string(value) and value != ""
            if ok:
                try:
                    validate_topic_name(value)  # MQTT-3.3.2-14: no wildcards
                except TopicError:
                    ok = False
        else:  # content_type
            ok = _is_mqtt_string(value)
        if not ok:
            raise Refused(BAD_PROPERTIES, f"property {name} has an invalid value {_quote(value)}")
        out[name] = value
    try:
        size = len(encode_properties(out))
    except (ValueError, TypeError, OverflowError) as exc:  # what the encoder would raise later
        raise Refused(BAD_PROPERTIES, f"properties cannot be encoded: {exc}") from None
    if size > MAX_PROPERTY_BYTES:
        raise Refused(BAD_PROPERTIES, f"property block of {size} bytes")
    return out


def _is_mqtt_string(value: object) -> bool:
    # An MQTT UTF-8 string: at most 65,535 bytes, no U+0000, no lone surrogates.
    if type(value) is not str or "\0" in value:
        return False
    if len(value) <= 16_383 and value.isascii():
        return True
    try:
        return len(value.encode("utf-8")) <= 0xFFFF
    except UnicodeEncodeError:
        return False


def check_origin(name: str) -> None:
    """The origin node name of a retained entry: a node name as zmesh.config allows."""
    if type(name) is not str or not _NAME_RE.fullmatch(name):
        raise Refused(BAD_ORIGIN, f"origin {_quote(name)} is not a node name")


def valid_name(name: object) -> bool:
    return type(name) is str and _NAME_RE.fullmatch(name) is not None


def valid_host(host: object) -> bool:
    """An IP address or an RFC 1123 host name: something ZeroMQ can be asked to dial."""
    if type(host) is not str or not host:
        return False
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return _HOST_RE.fullmatch(host) is not None


def valid_key(key: object) -> bool:
    return type(key) is str and _KEY_RE.fullmatch(key) is not None


def valid_queue(queue: object) -> bool:
    """A work queue name from a peer: a plain name (one topic level, as in
    ``$jobs/queue/NAME/+``), or ``$share/GROUP/FILTER`` for a shared subscription."""
    if type(queue) is not str or not queue or "\0" in queue or len(queue) > 4096:
        return False
    if queue.startswith("$share/"):
        group, _, filt = queue[7:].partition("/")
        return bool(group and filt) and "+" not in group and "#" not in group and _valid_filter(filt)
    return "/" not in queue and "+" not in queue and "#" not in queue and _is_mqtt_string(queue)


def _valid_filter(filt: str) -> bool:
    try:
        validate_topic_filter(filt)
    except TopicError:
        return False
    return True


def valid_job_id(job_id: object) -> bool:
    """A job id from a peer: it ends up in a topic name (``$jobs/queue/Q/ID``)."""
    return (
        type(job_id) is str and 0 < len(job_id) <= 1024 and "\0" not in job_id
        and "+" not in job_id and "#" not in job_id and _is_mqtt_string(job_id)
    )
