"""The stream decoder: bytes of one connection in, packets out. Pure: no sockets, no asyncio.

See ``zmesh.mqtt.codec`` for the design (fail early, one error type, the PUBLISH hot path).
"""

from __future__ import annotations

from typing import Any

from zmesh.mqtt.packets import (
    _PACKET_NAMES,
    _RC_AUTH,
    _RC_CONNACK,
    _RC_DISCONNECT,
    _RC_PUBACK,
    _RC_PUBREL,
    _RC_SUBACK,
    _RC_SUBACK_311,
    _RC_UNSUBACK,
    AUTH,
    CONNACK,
    CONNACK_NOT_AUTHORIZED,
    CONNECT,
    DISCONNECT,
    MALFORMED,
    MQTT_5,
    MQTT_31,
    MQTT_311,
    PACKET_TOO_LARGE,
    PROTOCOL_ERROR,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    TOPIC_NAME_INVALID,
    UNSUBACK,
    UNSUBSCRIBE,
    UNSUPPORTED_PROTOCOL_VERSION,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
    MQTTError,
    Packet,
    PingReq,
    PingResp,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    SubAck,
    Subscribe,
    SubscriptionRequest,
    UnsubAck,
    Unsubscribe,
    Will,
)
from zmesh.mqtt.properties import (
    _malformed,
    _protocol_error,
    _read_binary,
    _read_properties,
    _read_str,
    _read_u8,
    _read_u16,
)

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
            if not byte and shift:
                # Section 1.5.5: the minimum number of bytes (MQTT-1.5.5-1); a trailing zero
                # byte would let one value have several encodings.
                raise _malformed("remaining length not encoded in the minimum number of bytes")
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
    if not qos and first & 0x08:
        raise _malformed("PUBLISH: DUP flag set on a QoS 0 message (MQTT-3.3.1-2)")
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
