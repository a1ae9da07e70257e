"""The wire's field types and MQTT 5 properties: which property may appear where, with
which value kind, and the readers and writers of integers, strings, binary data, variable
byte integers and property blocks. Pure: no sockets, no asyncio.

Every reader takes (data, pos, end) and returns (value, new_pos); ``end`` bounds the read so
that a field never runs past its packet or its property block.
"""

from __future__ import annotations

import struct
from typing import Any

from zmesh.mqtt.packets import (
    _PACKET_NAMES,
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MALFORMED,
    MAX_REMAINING_LENGTH,
    PROTOCOL_ERROR,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    TOPIC_ALIAS_INVALID,
    UNSUBACK,
    MQTTError,
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
            if not byte and shift:
                raise _malformed("variable byte integer not in the minimum number of bytes (MQTT-1.5.5-1)")
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
    response_topic = props.get("response_topic")
    if response_topic is not None and ("+" in response_topic or "#" in response_topic or not response_topic):
        # A Response Topic is a topic name: no wildcards (MQTT-3.3.2-14; a will's too), and never empty (MQTT-4.7.3-1).
        raise _protocol_error(f"{context}: response_topic {response_topic!r} is not a topic name")
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
