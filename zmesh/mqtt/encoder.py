"""Packets to bytes, for the protocol level of one connection. Pure: no sockets, no asyncio.

``encode_publish`` takes the topic already UTF-8 encoded and the properties already encoded,
so that one message fanned out to many clients is prepared once.
"""

from __future__ import annotations

import struct
from typing import Any

from zmesh.mqtt.packets import (
    AUTH,
    CONNACK,
    CONNECT,
    DISCONNECT,
    MQTT_5,
    MQTT_31,
    MQTT_311,
    PUBACK,
    PUBCOMP,
    PUBREC,
    PUBREL,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    Auth,
    ConnAck,
    Connect,
    Disconnect,
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
    UnsubAck,
    Unsubscribe,
)
from zmesh.mqtt.properties import (
    _U16_PACK,
    _binary,
    _frame,
    _string,
    encode_properties,
    remaining_length_bytes,
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
