"""Sans-I/O MQTT 3.1.1 and 5.0 codec: bytes in, packet dataclasses out, and back.

Design
------
* Pure: no sockets, no asyncio. ``Decoder.feed(bytes) -> list[Packet]`` buffers partial
  packets per connection; ``encode(packet, level) -> bytes`` is stateless.
* One error type. Every violation of the spec raises :class:`MQTTError` carrying the MQTT 5
  reason code the server should answer with (0x81 malformed, 0x82 protocol error, 0x95
  packet too large, ...), so the server never has to interpret codec internals. The decoder
  is poisoned after an error: the connection must be closed, so further feeds re-raise.
* Fail early. The fixed header is validated from its first byte (type, reserved flags,
  CONNECT-first) and the declared size is checked against ``max_packet_size`` as soon as the
  remaining-length varint is complete, before any of the body is buffered. A peer cannot
  make us hold 256 MB by announcing it.
* The hot path is PUBLISH. Decoding works on one ``bytes`` object with integer offsets (no
  memoryview/BytesIO objects, no intermediate tuples for the fixed header), packets are
  ``__slots__`` dataclasses built positionally, and a v5 PUBLISH without properties costs
  one byte test. Partial packets are kept as a list of chunks and joined once the announced
  size has arrived, so a large packet trickling in is copied once, not once per chunk.
  ``encode_publish`` takes the topic already UTF-8 encoded and the properties already
  encoded so the server can fan one message out to many clients cheaply.
* Validation belongs here only where it is about the wire format (UTF-8, reserved bits,
  lengths, property placement and duplicates, packet identifiers, reason-code sets). Topic
  filter syntax, topic aliases, authentication flows and client-id policy need state or
  configuration and are the server's job.
* Properties are plain ``dict[str, Any]`` with the spec's names in snake_case. Repeatable
  properties are lists: ``user_property`` (list of (name, value) tuples) always, and
  ``subscription_identifier`` on PUBLISH (it is a single int on SUBSCRIBE).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "MQTTError",
    "Will",
    "Connect",
    "ConnAck",
    "Publish",
    "PubAck",
    "PubRec",
    "PubRel",
    "PubComp",
    "SubscriptionRequest",
    "Subscribe",
    "SubAck",
    "Unsubscribe",
    "UnsubAck",
    "PingReq",
    "PingResp",
    "Disconnect",
    "Auth",
    "Packet",
    "Decoder",
    "encode",
    "encode_publish",
    "encode_properties",
    "remaining_length_bytes",
]

# ---------------------------------------------------------------------------- constants

MQTT_31 = 3
MQTT_311 = 4
MQTT_5 = 5

# Control packet types (high nibble of the first byte).
CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
AUTH = 15

# MQTT 5 reason codes (section 2.4).
SUCCESS = 0x00
NORMAL_DISCONNECTION = 0x00
GRANTED_QOS_0 = 0x00
GRANTED_QOS_1 = 0x01
GRANTED_QOS_2 = 0x02
DISCONNECT_WITH_WILL = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
CONTINUE_AUTHENTICATION = 0x18
RE_AUTHENTICATE = 0x19
UNSPECIFIED_ERROR = 0x80
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_SPECIFIC_ERROR = 0x83
UNSUPPORTED_PROTOCOL_VERSION = 0x84
CLIENT_ID_NOT_VALID = 0x85
BAD_USERNAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTHENTICATION_METHOD = 0x8C
KEEP_ALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_ID_IN_USE = 0x91
PACKET_ID_NOT_FOUND = 0x92
RECEIVE_MAXIMUM_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
USE_ANOTHER_SERVER = 0x9C
SERVER_MOVED = 0x9D
SHARED_SUBSCRIPTIONS_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
MAXIMUM_CONNECT_TIME = 0xA0
SUBSCRIPTION_IDENTIFIERS_NOT_SUPPORTED = 0xA1
WILDCARD_SUBSCRIPTIONS_NOT_SUPPORTED = 0xA2

# MQTT 3.1.1 CONNACK return codes (section 3.2.2.3).
CONNACK_ACCEPTED = 0
CONNACK_UNACCEPTABLE_PROTOCOL_VERSION = 1
CONNACK_IDENTIFIER_REJECTED = 2
CONNACK_SERVER_UNAVAILABLE = 3
CONNACK_BAD_USERNAME_OR_PASSWORD = 4
CONNACK_NOT_AUTHORIZED = 5

MAX_REMAINING_LENGTH = 268_435_455  # largest 4-byte variable byte integer

# Reason codes each MQTT 5 packet may carry; anything else is refused as a protocol error.
_RC_CONNACK = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
     0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
_RC_PUBACK = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})  # and PUBREC
_RC_PUBREL = frozenset({0x00, 0x92})  # and PUBCOMP
_RC_SUBACK = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
_RC_UNSUBACK = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
_RC_DISCONNECT = frozenset(
    {0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93,
     0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
)
_RC_AUTH = frozenset({0x00, 0x18, 0x19})
_RC_SUBACK_311 = frozenset({0x00, 0x01, 0x02, 0x80})


class MQTTError(Exception):
    """A packet broke the spec; ``reason_code`` is the MQTT 5 code to answer with.

    ``packets`` holds the packets decoded from the same ``feed`` call before the bad one,
    so a server may still act on them (e.g. a DISCONNECT) before closing.
    """

    def __init__(self, reason_code: int, reason: str) -> None:
        super().__init__(reason)
        self.reason_code = reason_code
        self.reason = reason
        self.packets: list[Packet] = []


# ---------------------------------------------------------------------------- packets


@dataclass(slots=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Connect:
    client_id: str
    protocol_level: int = MQTT_311
    clean_start: bool = True
    keepalive: int = 60
    username: str | None = None
    password: bytes | None = None
    will: Will | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    protocol_name: str = "MQTT"


@dataclass(slots=True)
class ConnAck:
    session_present: bool = False
    reason_code: int = 0  # MQTT 5 reason code, or the 3.1.1 return code (0..5) at level 3/4
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Publish:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    dup: bool = False
    packet_id: int | None = None
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PubAck:
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PubRec:
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PubRel:
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PubComp:
    packet_id: int
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SubscriptionRequest:
    filter: str
    qos: int = 0
    no_local: bool = False
    retain_as_published: bool = False
    retain_handling: int = 0


@dataclass(slots=True)
class Subscribe:
    packet_id: int
    subscriptions: list[SubscriptionRequest]
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class SubAck:
    packet_id: int
    reason_codes: list[int]
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Unsubscribe:
    packet_id: int
    filters: list[str]
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class UnsubAck:
    packet_id: int
    reason_codes: list[int] = field(default_factory=list)  # always empty at 3.1.1
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class PingReq:
    pass


@dataclass(slots=True)
class PingResp:
    pass


@dataclass(slots=True)
class Disconnect:
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Auth:
    reason_code: int = 0
    properties: dict[str, Any] = field(default_factory=dict)


Packet = (
    Connect | ConnAck | Publish | PubAck | PubRec | PubRel | PubComp | Subscribe | SubAck
    | Unsubscribe | UnsubAck | PingReq | PingResp | Disconnect | Auth
)

_PACKET_NAMES = (
    "reserved(0)", "CONNECT", "CONNACK", "PUBLISH", "PUBACK", "PUBREC", "PUBREL", "PUBCOMP",
    "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK", "PINGREQ", "PINGRESP", "DISCONNECT", "AUTH",
)

# ---------------------------------------------------------------------------- properties

# Value kinds on the wire (section 1.5).
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)

# Where a property may appear: one bit per packet type; the Will properties of a CONNECT
# use bit 0 (packet type 0 is reserved, so the bit is otherwise free).
_WILL_BIT = 1 << 0
_ALL_ACKS = (
    1 << CONNACK | 1 << PUBACK | 1 << PUBREC | 1 << PUBREL | 1 << PUBCOMP | 1 << SUBACK
    | 1 << UNSUBACK | 1 << DISCONNECT | 1 << AUTH
)
_MESSAGE = 1 << PUBLISH | _WILL_BIT

# (identifier, name, kind, packets allowed) — section 2.2.2.2
_PROPERTY_TABLE: tuple[tuple[int, str, int, int], ...] = (
    (0x01, "payload_format_indicator", _BYTE, _MESSAGE),
    (0x02, "message_expiry_interval", _U32, _MESSAGE),
    (0x03, "content_type", _STR, _MESSAGE),
    (0x08, "response_topic", _STR, _MESSAGE),
    (0x09, "correlation_data", _BIN, _MESSAGE),
    (0x0B, "subscription_identifier", _VARINT, 1 << PUBLISH | 1 << SUBSCRIBE),
    (0x11, "session_expiry_interval", _U32, 1 << CONNECT | 1 << CONNACK | 1 << DISCONNECT),
    (0x12, "assigned_client_identifier", _STR, 1 << CONNACK),
    (0x13, "server_keep_alive", _U16, 1 << CONNACK),
    (0x15, "authentication_method", _STR, 1 << CONNECT | 1 << CONNACK | 1 << AUTH),
    (0x16, "authentication_data", _BIN, 1 << CONNECT | 1 << CONNACK | 1 << AUTH),
    (0x17, "request_problem_information", _BYTE, 1 << CONNECT),
    (0x18, "will_delay_interval", _U32, _WILL_BIT),
    (0x19, "request_response_information", _BYTE, 1 << CONNECT),
    (0x1A, "response_information", _STR, 1 << CONNACK),
    (0x1C, "server_reference", _STR, 1 << CONNACK | 1 << DISCONNECT),
    (0x1F, "reason_string", _STR, _ALL_ACKS),
    (0x21, "receive_maximum", _U16, 1 << CONNECT | 1 << CONNACK),
    (0x22, "topic_alias_maximum", _U16, 1 << CONNECT | 1 << CONNACK),
    (0x23, "topic_alias", _U16, 1 << PUBLISH),
    (0x24, "maximum_qos", _BYTE, 1 << CONNACK),
    (0x25, "retain_available", _BYTE, 1 << CONNACK),
    (0x26, "user_property", _PAIR, 0xFFFF),  # every packet that has properties, and Will
    (0x27, "maximum_packet_size", _U32, 1 << CONNECT | 1 << CONNACK),
    (0x28, "wildcard_subscription_available", _BYTE, 1 << CONNACK),
    (0x29, "subscription_identifier_available", _BYTE, 1 << CONNACK),
    (0x2A, "shared_subscription_available", _BYTE, 1 << CONNACK),
)
_PROPERTY_BY_ID: list[tuple[str, int, int] | None] = [None] * 256
for _pid, _name, _kind, _mask in _PROPERTY_TABLE:
    _PROPERTY_BY_ID[_pid] = (_name, _kind, _mask)
_PROPERTY_BY_NAME: dict[str, tuple[int, int]] = {
    name: (pid, kind) for pid, name, kind, _ in _PROPERTY_TABLE
}
# Byte-valued properties that the spec defines as 0/1; other values are protocol errors.
_BOOLEAN_PROPERTIES = frozenset(
    {"payload_format_indicator", "request_problem_information", "request_response_information",
     "maximum_qos", "retain_available", "wildcard_subscription_available",
     "subscription_identifier_available", "shared_subscription_available"}
)
# Properties for which the spec calls a value of zero a protocol error.
_NONZERO_PROPERTIES = frozenset({"receive_maximum", "maximum_packet_size", "subscription_identifier"})

_U16_PACK = struct.Struct(">H").pack
_U32_PACK = struct.Struct(">I").pack
_U16_UNPACK_FROM = struct.Struct(">H").unpack_from
_U32_UNPACK_FROM = struct.Struct(">I").unpack_from

# ---------------------------------------------------------------------------- primitives: decode
# Every reader takes (data, pos, end) and returns (value, new_pos); ``end`` bounds the read
# so that a field can never run past its packet (or its property block).


def _malformed(reason: str) -> MQTTError:
    return MQTTError(MALFORMED, reason)


def _protocol_error(reason: str) -> MQTTError:
    return MQTTError(PROTOCOL_ERROR, reason)


def _read_u8(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos >= end:
        raise _malformed("packet too short: expected a byte")
    return data[pos], pos + 1


def _read_u16(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 2 > end:
        raise _malformed("packet too short: expected a two-byte integer")
    return (data[pos] << 8) | data[pos + 1], pos + 2


def _read_u32(data: bytes, pos: int, end: int) -> tuple[int, int]:
    if pos + 4 > end:
        raise _malformed("packet too short: expected a four-byte integer")
    return _U32_UNPACK_FROM(data, pos)[0], pos + 4


def _read_varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= end:
            raise _malformed("packet too short: truncated variable byte integer")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    raise _malformed("variable byte integer longer than 4 bytes")


def _read_binary(data: bytes, pos: int, end: int) -> tuple[bytes, int]:
    if pos + 2 > end:
        raise _malformed("packet too short: expected a length prefix")
    stop = pos + 2 + ((data[pos] << 8) | data[pos + 1])
    if stop > end:
        raise _malformed("length prefix runs past the end of the packet")
    return data[pos + 2 : stop], stop


def _read_str(data: bytes, pos: int, end: int) -> tuple[str, int]:
    raw, pos = _read_binary(data, pos, end)
    return _utf8(raw), pos


def _utf8(raw: bytes) -> str:
    """Decode a UTF-8 string field the way section 1.5.4 demands."""
    try:
        # Python's strict decoder already rejects overlong forms and encoded surrogates
        # (U+D800..U+DFFF), both of which the spec calls malformed.
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _malformed(f"invalid UTF-8 in string: {exc.reason}") from None
    if "\x00" in text:
        raise _malformed("string contains U+0000")
    return text


def _read_pair(data: bytes, pos: int, end: int) -> tuple[tuple[str, str], int]:
    name, pos = _read_str(data, pos, end)
    value, pos = _read_str(data, pos, end)
    return (name, value), pos


_READERS: tuple[Any, ...] = (_read_u8, _read_u16, _read_u32, _read_varint, _read_str, _read_binary, _read_pair)


def _read_properties(data: bytes, pos: int, end: int, where: int) -> tuple[dict[str, Any], int]:
    """Read an MQTT 5 property block; ``where`` is the packet type (0 for Will properties)."""
    length, pos = _read_varint(data, pos, end)
    stop = pos + length
    if stop > end:
        raise _malformed("property length runs past the end of the packet")
    props: dict[str, Any] = {}
    if not length:
        return props, pos
    bit = 1 << where
    context = "Will" if where == 0 else _PACKET_NAMES[where]
    while pos < stop:
        entry = _PROPERTY_BY_ID[data[pos]]
        if entry is None:
            raise _malformed(f"{context}: unknown property identifier {data[pos]:#04x}")
        name, kind, mask = entry
        if not mask & bit:
            # Section 2.2.2.2: an identifier not valid for the packet type is malformed.
            raise _malformed(f"{context}: property {name} is not allowed here")
        # Reads are bounded by ``stop`` so a value cannot straddle the declared length.
        value, pos = _READERS[kind](data, pos + 1, stop)
        if kind == _PAIR:
            props.setdefault(name, []).append(value)
            continue
        if name == "subscription_identifier" and where == PUBLISH:
            # A PUBLISH carries one identifier per matching subscription.
            if value == 0:
                raise _protocol_error("PUBLISH: subscription_identifier 0 is not allowed")
            props.setdefault(name, []).append(value)
            continue
        if name in props:
            raise _protocol_error(f"{context}: property {name} appears more than once")
        if name in _BOOLEAN_PROPERTIES:
            if value > 1:
                raise _protocol_error(f"{context}: property {name} must be 0 or 1, got {value}")
        elif value == 0 and name in _NONZERO_PROPERTIES:
            raise _protocol_error(f"{context}: property {name} must not be 0")
        elif value == 0 and name == "topic_alias":
            raise MQTTError(TOPIC_ALIAS_INVALID, "PUBLISH: topic_alias 0 is not allowed")
        props[name] = value
    if "authentication_data" in props and "authentication_method" not in props:
        raise _protocol_error(f"{context}: authentication_data without authentication_method")
    return props, stop


# ---------------------------------------------------------------------------- primitives: encode


def remaining_length_bytes(n: int) -> bytes:
    """Encode ``n`` as an MQTT variable byte integer (1 to 4 bytes)."""
    if n < 0x80:
        if n < 0:
            raise ValueError(f"variable byte integer must not be negative: {n}")
        return bytes((n,))
    if n > MAX_REMAINING_LENGTH:
        raise ValueError(f"variable byte integer too large: {n} > {MAX_REMAINING_LENGTH}")
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _binary(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"binary field of {len(value)} bytes exceeds 65535")
    return _U16_PACK(len(value)) + value


def _string(value: str) -> bytes:
    return _binary(value.encode("utf-8"))


def _encode_property(pid: int, kind: int, value: Any) -> bytes:
    if kind == _BYTE:
        return bytes((pid, int(value)))
    if kind == _U16:
        return bytes((pid,)) + _U16_PACK(value)
    if kind == _U32:
        return bytes((pid,)) + _U32_PACK(value)
    if kind == _VARINT:
        return bytes((pid,)) + remaining_length_bytes(value)
    if kind == _STR:
        return bytes((pid,)) + _string(value)
    if kind == _BIN:
        return bytes((pid,)) + _binary(bytes(value))
    name, text = value
    return bytes((pid,)) + _string(name) + _string(text)


def encode_properties(properties: dict[str, Any]) -> bytes:
    """Encode an MQTT 5 property block, length prefix included (``b"\\x00"`` when empty).

    ``user_property`` is a list of (name, value) pairs; ``subscription_identifier`` may be an
    int or a list of ints. Placement rules are not checked: the caller builds the dict.
    """
    if not properties:
        return b"\x00"
    parts: list[bytes] = []
    for name, value in properties.items():
        try:
            pid, kind = _PROPERTY_BY_NAME[name]
        except KeyError:
            raise ValueError(f"unknown MQTT 5 property {name!r}") from None
        if kind == _PAIR or (kind == _VARINT and isinstance(value, (list, tuple))):
            parts.extend(_encode_property(pid, kind, item) for item in value)
        else:
            parts.append(_encode_property(pid, kind, value))
    body = b"".join(parts)
    return remaining_length_bytes(len(body)) + body


def _frame(first_byte: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        return bytes((first_byte, n)) + body
    return bytes((first_byte,)) + remaining_length_bytes(n) + body


# ---------------------------------------------------------------------------- decoding

# Fixed-header flags each packet type must carry (section 2.1.3); PUBLISH (-1) has real
# flags and type 0 (None) is reserved. AUTH is reserved before MQTT 5: checked separately.
_REQUIRED_FLAGS: tuple[int | None, ...] = (None, 0, 0, -1, 0, 0, 2, 0, 2, 0, 2, 0, 0, 0, 0, 0)


def _read_remaining_length(data: bytes, pos: int, n: int) -> tuple[int, int] | None:
    """Decode the fixed header's remaining length; None while its bytes are still incomplete."""
    value = 0
    for shift in (0, 7, 14, 21):
        if pos >= n:
            return None
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
    # Raised as soon as the fourth byte arrives, without waiting for a fifth.
    raise _malformed("remaining length longer than 4 bytes")


class Decoder:
    """Stateful per-connection stream decoder.

    ``protocol_level`` is None until a CONNECT is decoded (a server-side decoder), or set by
    the caller (a client-side decoder, which never sees a CONNECT). While it is None only a
    CONNECT is accepted; once it is set a CONNECT is a protocol error.
    """

    __slots__ = ("max_packet_size", "protocol_level", "_pending", "_pending_size", "_need", "_error")

    def __init__(self, max_packet_size: int = 1 << 20, protocol_level: int | None = None) -> None:
        self.max_packet_size = max_packet_size
        self.protocol_level = protocol_level
        # Chunks of an incomplete packet, joined only when ``_need`` bytes have arrived.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._need = 0
        self._error: MQTTError | None = None

    def feed(self, data: bytes) -> list[Packet]:
        """Add bytes from the wire; return every packet they complete, in order."""
        if self._error is not None:
            raise self._error
        if type(data) is not bytes:
            data = bytes(data)  # slices of a bytearray would hand out mutable payloads
        if self._pending:
            self._pending.append(data)
            self._pending_size += len(data)
            if self._pending_size < self._need:
                return []
            data = b"".join(self._pending)
            self._pending = []
        packets: list[Packet] = []
        n = len(data)
        pos = 0
        need = 0
        level = self.protocol_level  # a local: read once per packet on the hot path
        max_size = self.max_packet_size
        try:
            while pos < n:
                first = data[pos]
                ptype = first >> 4
                if ptype == PUBLISH:
                    if first & 0x06 == 0x06:
                        raise _malformed("PUBLISH with QoS 3")
                    if level is None:
                        raise _protocol_error("the first packet must be CONNECT, got PUBLISH")
                else:
                    self._check_fixed_header(ptype, first & 0x0F)
                # Remaining length: one byte in the common case, else up to four.
                if pos + 1 >= n:
                    need = n - pos + 1
                    break
                length = data[pos + 1]
                body = pos + 2
                if length >= 0x80:
                    parsed = _read_remaining_length(data, pos + 1, n)
                    if parsed is None:
                        need = n - pos + 1
                        break
                    length, body = parsed
                end = body + length
                if end - pos > max_size:
                    raise MQTTError(
                        PACKET_TOO_LARGE,
                        f"{_PACKET_NAMES[ptype]} of {end - pos} bytes exceeds the maximum "
                        f"packet size of {self.max_packet_size}",
                    )
                if end > n:
                    need = end - pos
                    break
                if ptype == PUBLISH:
                    packets.append(_decode_publish(first, data, body, end, level))
                elif ptype == CONNECT:
                    packets.append(self._decode_connect(data, body, end))
                    level = self.protocol_level
                else:
                    packets.append(_DECODERS[ptype](first, data, body, end, level))
                pos = end
        except MQTTError as exc:
            exc.packets = packets
            self._error = exc
            raise
        if pos < n:
            rest = data[pos:] if pos else data
            self._pending = [rest]
            self._pending_size = len(rest)
            self._need = need
        return packets

    def _check_fixed_header(self, ptype: int, flags: int) -> None:
        required = _REQUIRED_FLAGS[ptype]
        if required is None or (ptype == AUTH and self.protocol_level is not None and self.protocol_level < MQTT_5):
            raise _malformed(f"reserved packet type {ptype}")
        if flags != required:
            raise _malformed(
                f"{_PACKET_NAMES[ptype]}: fixed header flags {flags:#06b}, must be {required:#06b}"
            )
        if ptype == CONNECT:
            if self.protocol_level is not None:
                raise _protocol_error("a second CONNECT on the same connection")
        elif self.protocol_level is None:
            raise _protocol_error(f"the first packet must be CONNECT, got {_PACKET_NAMES[ptype]}")

    def _decode_connect(self, data: bytes, pos: int, end: int) -> Connect:
        name, pos = _read_str(data, pos, end)
        level, pos = _read_u8(data, pos, end)
        if not ((name == "MQTT" and level in (MQTT_311, MQTT_5)) or (name == "MQIsdp" and level == MQTT_31)):
            raise MQTTError(
                UNSUPPORTED_PROTOCOL_VERSION,
                f"CONNECT: unsupported protocol {name!r} level {level}",
            )
        # Known from here on, even if the rest is bad: the server answers in this version.
        self.protocol_level = level
        v5 = level == MQTT_5
        flags, pos = _read_u8(data, pos, end)
        if flags & 0x01:
            raise _malformed("CONNECT: reserved flag bit 0 is set")
        has_will = bool(flags & 0x04)
        will_qos = (flags >> 3) & 0x03
        will_retain = bool(flags & 0x20)
        has_password = bool(flags & 0x40)
        has_username = bool(flags & 0x80)
        if will_qos == 3:
            raise _malformed("CONNECT: will QoS 3")
        if not has_will and (will_qos or will_retain):
            raise _malformed("CONNECT: will QoS or will retain set without the will flag")
        if has_password and not has_username and not v5:
            raise _malformed("CONNECT: password flag set without username flag")
        keepalive, pos = _read_u16(data, pos, end)
        properties: dict[str, Any] = {}
        if v5:
            properties, pos = _read_properties(data, pos, end, CONNECT)
        client_id, pos = _read_str(data, pos, end)
        will = None
        if has_will:
            will_properties: dict[str, Any] = {}
            if v5:
                will_properties, pos = _read_properties(data, pos, end, 0)
            will_topic, pos = _read_str(data, pos, end)
            _check_topic_name(will_topic, level, "CONNECT will", allow_empty=False)
            will_payload, pos = _read_binary(data, pos, end)
            will = Will(will_topic, will_payload, will_qos, will_retain, will_properties)
        username = password = None
        if has_username:
            username, pos = _read_str(data, pos, end)
        if has_password:
            password, pos = _read_binary(data, pos, end)
        if pos != end:
            raise _malformed(f"CONNECT: {end - pos} unexpected bytes after the payload")
        return Connect(
            client_id, level, bool(flags & 0x02), keepalive, username, password, will, properties, name
        )


def _check_topic_name(topic: str, level: int | None, context: str, allow_empty: bool) -> None:
    if not topic:
        if allow_empty and level == MQTT_5:
            return  # v5: the topic comes from a topic alias, resolved by the server
        raise MQTTError(
            TOPIC_NAME_INVALID if level == MQTT_5 else MALFORMED, f"{context}: empty topic name"
        )
    if "+" in topic or "#" in topic:
        raise MQTTError(
            TOPIC_NAME_INVALID if level == MQTT_5 else PROTOCOL_ERROR,
            f"{context}: topic name {topic!r} contains a wildcard",
        )


def _check_end(pos: int, end: int, what: str) -> None:
    if pos != end:
        raise _malformed(f"{what}: {end - pos} unexpected bytes at the end of the packet")


def _decode_publish(first: int, data: bytes, pos: int, end: int, level: int | None) -> Publish:
    # The hot path: string and packet-id reads are inlined rather than calling helpers.
    if pos + 2 > end:
        raise _malformed("PUBLISH: packet too short for the topic length")
    start = pos + 2
    pos = start + ((data[pos] << 8) | data[pos + 1])
    if pos > end:
        raise _malformed("PUBLISH: topic length runs past the end of the packet")
    try:
        topic = data[start:pos].decode()
    except UnicodeDecodeError as exc:
        raise _malformed(f"PUBLISH: topic is not valid UTF-8: {exc.reason}") from None
    if "+" in topic or "#" in topic or "\x00" in topic or not topic:
        if "\x00" in topic:
            raise _malformed("PUBLISH: topic contains U+0000")
        _check_topic_name(topic, level, "PUBLISH", allow_empty=True)
    qos = (first >> 1) & 0x03
    packet_id = None
    if qos:
        if pos + 2 > end:
            raise _malformed("PUBLISH: packet too short for the packet identifier")
        packet_id = (data[pos] << 8) | data[pos + 1]
        if not packet_id:
            raise _protocol_error("PUBLISH: packet identifier 0 with QoS > 0")
        pos += 2
    if level == MQTT_5:
        if pos < end and data[pos] == 0:
            properties: dict[str, Any] = {}
            pos += 1
        else:
            properties, pos = _read_properties(data, pos, end, PUBLISH)
        return Publish(topic, data[pos:end], qos, first & 0x01 == 1, first & 0x08 == 8, packet_id, properties)
    return Publish(topic, data[pos:end], qos, first & 0x01 == 1, first & 0x08 == 8, packet_id, {})


def _read_packet_id(data: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    if pos + 2 > end:
        raise _malformed(f"{what}: packet too short for the packet identifier")
    packet_id = (data[pos] << 8) | data[pos + 1]
    if not packet_id:
        raise _protocol_error(f"{what}: packet identifier 0")
    return packet_id, pos + 2


def _check_reason(code: int, allowed: frozenset[int], what: str) -> None:
    if code not in allowed:
        raise _protocol_error(f"{what}: reason code {code:#04x} is not defined for this packet")


def _decode_connack(first: int, data: bytes, pos: int, end: int, level: int | None) -> ConnAck:
    flags, pos = _read_u8(data, pos, end)
    if flags & 0xFE:
        raise _malformed("CONNACK: reserved acknowledge flags are set")
    code, pos = _read_u8(data, pos, end)
    properties: dict[str, Any] = {}
    if level == MQTT_5:
        _check_reason(code, _RC_CONNACK, "CONNACK")
        properties, pos = _read_properties(data, pos, end, CONNACK)
    elif code > CONNACK_NOT_AUTHORIZED:
        raise _protocol_error(f"CONNACK: return code {code} is reserved")
    _check_end(pos, end, "CONNACK")
    return ConnAck(bool(flags), code, properties)


def _make_ack_decoder(cls: type, ptype: int, allowed: frozenset[int]) -> Any:
    what = _PACKET_NAMES[ptype]

    def decode(first: int, data: bytes, pos: int, end: int, level: int | None) -> Any:
        packet_id, pos = _read_packet_id(data, pos, end, what)
        if level != MQTT_5 or pos == end:
            # v5 allows omitting reason code (0) and properties when they are default.
            _check_end(pos, end, what)
            return cls(packet_id)
        code = data[pos]
        _check_reason(code, allowed, what)
        properties: dict[str, Any] = {}
        if pos + 1 < end:
            properties, pos = _read_properties(data, pos + 1, end, ptype)
            _check_end(pos, end, what)
        return cls(packet_id, code, properties)

    return decode


def _decode_subscribe(first: int, data: bytes, pos: int, end: int, level: int | None) -> Subscribe:
    packet_id, pos = _read_packet_id(data, pos, end, "SUBSCRIBE")
    v5 = level == MQTT_5
    properties: dict[str, Any] = {}
    if v5:
        properties, pos = _read_properties(data, pos, end, SUBSCRIBE)
    subscriptions: list[SubscriptionRequest] = []
    while pos < end:
        topic_filter, pos = _read_str(data, pos, end)
        options, pos = _read_u8(data, pos, end)
        qos = options & 0x03
        if v5:
            if options & 0xC0:
                raise _malformed("SUBSCRIBE: reserved bits of the subscription options are set")
            retain_handling = (options >> 4) & 0x03
            # Section 3.8.3.1 calls QoS 3 and Retain Handling 3 protocol errors in v5.
            if qos == 3:
                raise _protocol_error("SUBSCRIBE: maximum QoS 3")
            if retain_handling == 3:
                raise _protocol_error("SUBSCRIBE: retain handling 3")
            subscriptions.append(
                SubscriptionRequest(topic_filter, qos, bool(options & 0x04), bool(options & 0x08), retain_handling)
            )
        else:
            if options & 0xFC:
                raise _malformed("SUBSCRIBE: reserved bits of the requested QoS byte are set")
            if qos == 3:
                raise _malformed("SUBSCRIBE: requested QoS 3")
            subscriptions.append(SubscriptionRequest(topic_filter, qos))
    if not subscriptions:
        raise _protocol_error("SUBSCRIBE without any topic filter")
    return Subscribe(packet_id, subscriptions, properties)


def _decode_suback(first: int, data: bytes, pos: int, end: int, level: int | None) -> SubAck:
    packet_id, pos = _read_packet_id(data, pos, end, "SUBACK")
    properties: dict[str, Any] = {}
    allowed = _RC_SUBACK_311
    if level == MQTT_5:
        properties, pos = _read_properties(data, pos, end, SUBACK)
        allowed = _RC_SUBACK
    codes = list(data[pos:end])
    if not codes:
        raise _protocol_error("SUBACK without any reason code")
    for code in codes:
        _check_reason(code, allowed, "SUBACK")
    return SubAck(packet_id, codes, properties)


def _decode_unsubscribe(first: int, data: bytes, pos: int, end: int, level: int | None) -> Unsubscribe:
    packet_id, pos = _read_packet_id(data, pos, end, "UNSUBSCRIBE")
    properties: dict[str, Any] = {}
    if level == MQTT_5:
        properties, pos = _read_properties(data, pos, end, UNSUBSCRIBE)
    filters: list[str] = []
    while pos < end:
        topic_filter, pos = _read_str(data, pos, end)
        filters.append(topic_filter)
    if not filters:
        raise _protocol_error("UNSUBSCRIBE without any topic filter")
    return Unsubscribe(packet_id, filters, properties)


def _decode_unsuback(first: int, data: bytes, pos: int, end: int, level: int | None) -> UnsubAck:
    packet_id, pos = _read_packet_id(data, pos, end, "UNSUBACK")
    if level != MQTT_5:
        _check_end(pos, end, "UNSUBACK")
        return UnsubAck(packet_id)
    properties, pos = _read_properties(data, pos, end, UNSUBACK)
    codes = list(data[pos:end])
    if not codes:
        raise _protocol_error("UNSUBACK without any reason code")
    for code in codes:
        _check_reason(code, _RC_UNSUBACK, "UNSUBACK")
    return UnsubAck(packet_id, codes, properties)


def _decode_pingreq(first: int, data: bytes, pos: int, end: int, level: int | None) -> PingReq:
    _check_end(pos, end, "PINGREQ")
    return PingReq()


def _decode_pingresp(first: int, data: bytes, pos: int, end: int, level: int | None) -> PingResp:
    _check_end(pos, end, "PINGRESP")
    return PingResp()


def _decode_disconnect(first: int, data: bytes, pos: int, end: int, level: int | None) -> Disconnect:
    if level != MQTT_5 or pos == end:
        _check_end(pos, end, "DISCONNECT")
        return Disconnect()
    code = data[pos]
    _check_reason(code, _RC_DISCONNECT, "DISCONNECT")
    properties: dict[str, Any] = {}
    if pos + 1 < end:  # "If the Remaining Length is less than 2, a value of 0 is used"
        properties, pos = _read_properties(data, pos + 1, end, DISCONNECT)
        _check_end(pos, end, "DISCONNECT")
    return Disconnect(code, properties)


def _decode_auth(first: int, data: bytes, pos: int, end: int, level: int | None) -> Auth:
    if pos == end:
        return Auth()
    code = data[pos]
    _check_reason(code, _RC_AUTH, "AUTH")
    properties: dict[str, Any] = {}
    if pos + 1 < end:
        properties, pos = _read_properties(data, pos + 1, end, AUTH)
        _check_end(pos, end, "AUTH")
    return Auth(code, properties)


# Indexed by packet type; CONNECT and PUBLISH are dispatched inline by the decoder.
_DECODERS: tuple[Any, ...] = (
    None,
    None,
    _decode_connack,
    None,
    _make_ack_decoder(PubAck, PUBACK, _RC_PUBACK),
    _make_ack_decoder(PubRec, PUBREC, _RC_PUBACK),
    _make_ack_decoder(PubRel, PUBREL, _RC_PUBREL),
    _make_ack_decoder(PubComp, PUBCOMP, _RC_PUBREL),
    _decode_subscribe,
    _decode_suback,
    _decode_unsubscribe,
    _decode_unsuback,
    _decode_pingreq,
    _decode_pingresp,
    _decode_disconnect,
    _decode_auth,
)

# ---------------------------------------------------------------------------- encoding


def encode_publish(
    topic: bytes,
    payload: bytes,
    qos: int,
    retain: bool,
    dup: bool,
    packet_id: int | None,
    protocol_level: int,
    properties: bytes = b"",
) -> bytes:
    """Encode a PUBLISH from a pre-encoded topic and (v5) pre-encoded property block.

    ``properties`` is the output of :func:`encode_properties`; ``b""`` means none. It is
    ignored below MQTT 5. This is the fan-out path: one call per delivery, no dict work.
    """
    topic_len = len(topic)
    if topic_len > 0xFFFF:
        raise ValueError(f"topic of {topic_len} bytes exceeds 65535")
    if protocol_level == MQTT_5:
        if not properties:
            properties = b"\x00"
    else:
        properties = b""
    first = 0x30 | (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
    if qos:
        if not packet_id:
            raise ValueError("PUBLISH with QoS > 0 needs a non-zero packet identifier")
        length = 4 + topic_len + len(properties) + len(payload)
        head = _U16_PACK(topic_len) + topic + _U16_PACK(packet_id)
    else:
        length = 2 + topic_len + len(properties) + len(payload)
        head = _U16_PACK(topic_len) + topic
    if length < 0x80:
        return b"".join((bytes((first, length)), head, properties, payload))
    return b"".join((bytes((first,)), remaining_length_bytes(length), head, properties, payload))


def _props(packet_properties: dict[str, Any], level: int) -> bytes:
    return encode_properties(packet_properties) if level == MQTT_5 else b""


def _encode_connect(p: Connect, level: int) -> bytes:
    # A CONNECT states its own level; the ``protocol_level`` argument is ignored for it.
    level = p.protocol_level
    v5 = level == MQTT_5
    name = "MQIsdp" if level == MQTT_31 and p.protocol_name == "MQTT" else p.protocol_name
    flags = 0x02 if p.clean_start else 0
    will = p.will
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    if p.password is not None:
        flags |= 0x40
    if p.username is not None:
        flags |= 0x80
    parts = [_string(name), bytes((level, flags)), _U16_PACK(p.keepalive)]
    if v5:
        parts.append(encode_properties(p.properties))
    parts.append(_string(p.client_id))
    if will is not None:
        if v5:
            parts.append(encode_properties(will.properties))
        parts.append(_string(will.topic))
        parts.append(_binary(bytes(will.payload)))
    if p.username is not None:
        parts.append(_string(p.username))
    if p.password is not None:
        parts.append(_binary(bytes(p.password)))
    return _frame(CONNECT << 4, b"".join(parts))


def _encode_connack(p: ConnAck, level: int) -> bytes:
    body = bytes((1 if p.session_present else 0, p.reason_code)) + _props(p.properties, level)
    return _frame(CONNACK << 4, body)


def _encode_publish_packet(p: Publish, level: int) -> bytes:
    props = encode_properties(p.properties) if level == MQTT_5 and p.properties else b""
    return encode_publish(
        p.topic.encode("utf-8"), bytes(p.payload), p.qos, p.retain, p.dup, p.packet_id, level, props
    )


def _make_ack_encoder(ptype: int) -> Any:
    first = ptype << 4 | (0x02 if ptype == PUBREL else 0)

    def encode_ack(p: Any, level: int) -> bytes:
        packet_id = _U16_PACK(p.packet_id)
        if level != MQTT_5 or (p.reason_code == 0 and not p.properties):
            return bytes((first, 2)) + packet_id
        if not p.properties:
            return bytes((first, 3)) + packet_id + bytes((p.reason_code,))
        return _frame(first, packet_id + bytes((p.reason_code,)) + encode_properties(p.properties))

    return encode_ack


def _encode_subscribe(p: Subscribe, level: int) -> bytes:
    parts = [_U16_PACK(p.packet_id), _props(p.properties, level)]
    for sub in p.subscriptions:
        options = sub.qos
        if level == MQTT_5:
            options |= (
                (0x04 if sub.no_local else 0)
                | (0x08 if sub.retain_as_published else 0)
                | (sub.retain_handling << 4)
            )
        parts.append(_string(sub.filter))
        parts.append(bytes((options,)))
    return _frame(SUBSCRIBE << 4 | 0x02, b"".join(parts))


def _encode_suback(p: SubAck, level: int) -> bytes:
    body = _U16_PACK(p.packet_id) + _props(p.properties, level) + bytes(p.reason_codes)
    return _frame(SUBACK << 4, body)


def _encode_unsubscribe(p: Unsubscribe, level: int) -> bytes:
    parts = [_U16_PACK(p.packet_id), _props(p.properties, level)]
    parts.extend(_string(f) for f in p.filters)
    return _frame(UNSUBSCRIBE << 4 | 0x02, b"".join(parts))


def _encode_unsuback(p: UnsubAck, level: int) -> bytes:
    if level != MQTT_5:
        return bytes((UNSUBACK << 4, 2)) + _U16_PACK(p.packet_id)
    body = _U16_PACK(p.packet_id) + encode_properties(p.properties) + bytes(p.reason_codes)
    return _frame(UNSUBACK << 4, body)


def _encode_pingreq(p: PingReq, level: int) -> bytes:
    return b"\xc0\x00"


def _encode_pingresp(p: PingResp, level: int) -> bytes:
    return b"\xd0\x00"


def _encode_reason_only(first: int, p: Disconnect | Auth, level: int) -> bytes:
    # Shortest form the spec allows: nothing when all default, no property length when none.
    if level != MQTT_5 or (p.reason_code == 0 and not p.properties):
        return bytes((first, 0))
    if not p.properties:
        return bytes((first, 1, p.reason_code))
    return _frame(first, bytes((p.reason_code,)) + encode_properties(p.properties))


def _encode_disconnect(p: Disconnect, level: int) -> bytes:
    return _encode_reason_only(DISCONNECT << 4, p, level)


def _encode_auth(p: Auth, level: int) -> bytes:
    if level != MQTT_5:
        raise ValueError("AUTH exists only in MQTT 5")
    return _encode_reason_only(AUTH << 4, p, level)


_ENCODERS: dict[type, Any] = {
    Connect: _encode_connect,
    ConnAck: _encode_connack,
    Publish: _encode_publish_packet,
    PubAck: _make_ack_encoder(PUBACK),
    PubRec: _make_ack_encoder(PUBREC),
    PubRel: _make_ack_encoder(PUBREL),
    PubComp: _make_ack_encoder(PUBCOMP),
    Subscribe: _encode_subscribe,
    SubAck: _encode_suback,
    Unsubscribe: _encode_unsubscribe,
    UnsubAck: _encode_unsuback,
    PingReq: _encode_pingreq,
    PingResp: _encode_pingresp,
    Disconnect: _encode_disconnect,
    Auth: _encode_auth,
}


def encode(packet: Packet, protocol_level: int = MQTT_311) -> bytes:
    """Encode ``packet`` for a connection speaking ``protocol_level``.

    Below MQTT 5 properties and MQTT 5-only reason codes are left out, as the spec requires.
    A value out of range for its field raises ``ValueError``; the encoder trusts the caller
    for everything else (the decoder is where untrusted input is validated).
    """
    try:
        encoder = _ENCODERS[type(packet)]
    except KeyError:
        raise TypeError(f"not an MQTT packet: {type(packet).__name__}") from None
    try:
        return encoder(packet, protocol_level)
    except (struct.error, OverflowError) as exc:
        raise ValueError(f"cannot encode {type(packet).__name__}: {exc}") from None
