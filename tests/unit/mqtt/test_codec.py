"""zmesh.mqtt.codec: round trips, arbitrary stream splits, fuzzing and spec violations.

The property tables below are written from the MQTT 5 spec (section 2.2.2.2) independently
of the codec's own table, so a wrong entry in either shows up as a failing round trip.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zmesh.mqtt.codec import (
    MALFORMED,
    MQTT_5,
    MQTT_31,
    MQTT_311,
    PACKET_TOO_LARGE,
    PROTOCOL_ERROR,
    TOPIC_ALIAS_INVALID,
    TOPIC_NAME_INVALID,
    UNSUPPORTED_PROTOCOL_VERSION,
    Auth,
    ConnAck,
    Connect,
    Decoder,
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
    encode,
    encode_properties,
    encode_publish,
    remaining_length_bytes,
)

FUZZ = settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
ROUND_TRIP = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------- strategies

text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12)
topic_name = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=12
)
binary = st.binary(max_size=24)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
flag = st.integers(0, 1)
packet_id = st.integers(1, 0xFFFF)

PROPERTY_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "payload_format_indicator": flag,
    "message_expiry_interval": u32,
    "content_type": text,
    "response_topic": topic_name,
    "correlation_data": binary,
    "subscription_identifier": st.integers(1, 268_435_455),
    "session_expiry_interval": u32,
    "assigned_client_identifier": text,
    "server_keep_alive": u16,
    "authentication_method": text,
    "authentication_data": binary,
    "request_problem_information": flag,
    "will_delay_interval": u32,
    "request_response_information": flag,
    "response_information": text,
    "server_reference": text,
    "reason_string": text,
    "receive_maximum": st.integers(1, 0xFFFF),
    "topic_alias_maximum": u16,
    "topic_alias": st.integers(1, 0xFFFF),
    "maximum_qos": flag,
    "retain_available": flag,
    "user_property": st.lists(st.tuples(text, text), min_size=1, max_size=3),
    "maximum_packet_size": st.integers(1, 0xFFFF_FFFF),
    "wildcard_subscription_available": flag,
    "subscription_identifier_available": flag,
    "shared_subscription_available": flag,
}
MESSAGE = ["payload_format_indicator", "message_expiry_interval", "content_type", "response_topic",
           "correlation_data", "user_property"]
ALLOWED: dict[str, list[str]] = {
    "connect": ["session_expiry_interval", "authentication_method", "authentication_data",
                "request_problem_information", "request_response_information", "receive_maximum",
                "topic_alias_maximum", "user_property", "maximum_packet_size"],
    "will": [*MESSAGE, "will_delay_interval"],
    "connack": ["session_expiry_interval", "assigned_client_identifier", "server_keep_alive",
                "authentication_method", "authentication_data", "response_information",
                "server_reference", "reason_string", "receive_maximum", "topic_alias_maximum",
                "maximum_qos", "retain_available", "user_property", "maximum_packet_size",
                "wildcard_subscription_available", "subscription_identifier_available",
                "shared_subscription_available"],
    "publish": [*MESSAGE, "topic_alias", "subscription_identifier"],
    "ack": ["reason_string", "user_property"],
    "subscribe": ["subscription_identifier", "user_property"],
    "unsubscribe": ["user_property"],
    "disconnect": ["session_expiry_interval", "server_reference", "reason_string", "user_property"],
    "auth": ["authentication_method", "authentication_data", "reason_string", "user_property"],
}

RC_CONNACK = [0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90,
              0x95, 0x97, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F]
RC_PUBACK = [0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99]
RC_PUBREL = [0x00, 0x92]
RC_SUBACK = [0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2]
RC_UNSUBACK = [0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91]
RC_DISCONNECT = [0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90,
                 0x93, 0x94, 0x95, 0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F,
                 0xA0, 0xA1, 0xA2]
RC_AUTH = [0x00, 0x18, 0x19]


def _with_auth_method(props: dict[str, Any]) -> dict[str, Any]:
    # Authentication Data without an Authentication Method is a protocol error.
    if "authentication_data" in props and "authentication_method" not in props:
        return {**props, "authentication_method": "SCRAM-SHA-1"}
    return props


def properties(where: str, level: int) -> st.SearchStrategy[dict[str, Any]]:
    if level != MQTT_5:
        return st.just({})
    optional = {name: PROPERTY_VALUES[name] for name in ALLOWED[where]}
    if where == "publish":  # may repeat on PUBLISH, so it is a list there
        optional["subscription_identifier"] = st.lists(PROPERTY_VALUES["subscription_identifier"], min_size=1, max_size=3)
    return st.fixed_dictionaries({}, optional=optional).map(_with_auth_method)


def wills(level: int) -> st.SearchStrategy[Will]:
    return st.builds(Will, topic_name, binary, st.integers(0, 2), st.booleans(), properties("will", level))


@st.composite
def connects(draw: st.DrawFn, level: int) -> Connect:
    username = draw(st.none() | text)
    # 3.1.1 forbids a password without a user name; MQTT 5 allows it.
    password = draw(st.none() | binary) if username is not None or level == MQTT_5 else None
    return Connect(
        client_id=draw(text),
        protocol_level=level,
        clean_start=draw(st.booleans()),
        keepalive=draw(u16),
        username=username,
        password=password,
        will=draw(st.none() | wills(level)),
        properties=draw(properties("connect", level)),
        protocol_name="MQIsdp" if level == MQTT_31 else "MQTT",
    )


@st.composite
def publishes(draw: st.DrawFn, level: int) -> Publish:
    qos = draw(st.integers(0, 2))
    # An empty topic is legal in MQTT 5 (the topic alias supplies it).
    topic = draw(topic_name | st.just("")) if level == MQTT_5 else draw(topic_name)
    return Publish(
        topic=topic,
        payload=draw(st.binary(max_size=200)),
        qos=qos,
        retain=draw(st.booleans()),
        dup=draw(st.booleans()) if qos else False,  # MQTT-3.3.1-2: never DUP at QoS 0
        packet_id=draw(packet_id) if qos else None,
        properties=draw(properties("publish", level)),
    )


def acks(cls: type, codes: list[int], level: int) -> st.SearchStrategy[Packet]:
    if level != MQTT_5:
        return st.builds(cls, packet_id)
    return st.builds(cls, packet_id, st.sampled_from(codes), properties("ack", level))


def subscription_requests(level: int) -> st.SearchStrategy[SubscriptionRequest]:
    if level != MQTT_5:
        return st.builds(SubscriptionRequest, text, st.integers(0, 2))
    return st.builds(
        SubscriptionRequest, text, st.integers(0, 2), st.booleans(), st.booleans(), st.integers(0, 2)
    )


def packets(level: int) -> st.SearchStrategy[Packet]:
    """Every packet type except CONNECT, valid for ``level``."""
    v5 = level == MQTT_5
    choices: list[st.SearchStrategy[Any]] = [
        st.builds(ConnAck, st.booleans(), st.sampled_from(RC_CONNACK) if v5 else st.integers(0, 5),
                  properties("connack", level)),
        publishes(level),
        acks(PubAck, RC_PUBACK, level),
        acks(PubRec, RC_PUBACK, level),
        acks(PubRel, RC_PUBREL, level),
        acks(PubComp, RC_PUBREL, level),
        st.builds(Subscribe, packet_id, st.lists(subscription_requests(level), min_size=1, max_size=4),
                  properties("subscribe", level)),
        st.builds(SubAck, packet_id, st.lists(st.sampled_from(RC_SUBACK if v5 else [0, 1, 2, 0x80]), min_size=1, max_size=4),
                  properties("ack", level)),
        st.builds(Unsubscribe, packet_id, st.lists(text, min_size=1, max_size=4), properties("unsubscribe", level)),
        st.builds(UnsubAck, packet_id, st.lists(st.sampled_from(RC_UNSUBACK), min_size=1, max_size=4) if v5 else st.just([]),
                  properties("ack", level)),
        st.just(PingReq()),
        st.just(PingResp()),
        st.builds(Disconnect, st.sampled_from(RC_DISCONNECT), properties("disconnect", level)) if v5 else st.just(Disconnect()),
    ]
    if v5:
        choices.append(st.builds(Auth, st.sampled_from(RC_AUTH), properties("auth", level)))
    return st.one_of(choices)


PACKETS = {level: packets(level) for level in (MQTT_311, MQTT_5)}
PACKETS[MQTT_31] = PACKETS[MQTT_311]  # 3.1 packets after CONNECT are 3.1.1 packets
CONNECTS = {level: connects(level) for level in (MQTT_31, MQTT_311, MQTT_5)}


@st.composite
def sessions(draw: st.DrawFn) -> tuple[int, list[Packet]]:
    """A CONNECT followed by packets of the same level, as a server-side decoder sees it."""
    level = draw(st.sampled_from([MQTT_31, MQTT_311, MQTT_5]))
    return level, [draw(CONNECTS[level]), *draw(st.lists(PACKETS[level], max_size=6))]


def corpus(level: int) -> list[bytes]:
    """Valid encodings of every packet type with most fields set: the seeds for mutation.

    Fixed rather than generated so that the fuzz examples go to mutations, not to drawing
    packets (which costs hypothesis far more than decoding does).
    """
    users = {"user_property": [("k", "v"), ("ключ", "значение")]}
    message = {"payload_format_indicator": 1, "message_expiry_interval": 30, "content_type": "text/plain",
               "response_topic": "re/ply", "correlation_data": b"\x01\x02", **users}
    will = Will("will/topic", b"gone", 1, True, {**message, "will_delay_interval": 5})
    items: list[Packet] = [
        Connect("client-1", level, False, 30, "user", b"secret", will,
                {"session_expiry_interval": 60, "receive_maximum": 10, "maximum_packet_size": 1000,
                 "topic_alias_maximum": 4, "request_problem_information": 1,
                 "request_response_information": 0, "authentication_method": "m",
                 "authentication_data": b"d", **users},
                "MQIsdp" if level == MQTT_31 else "MQTT"),
        ConnAck(True, 0, {"session_expiry_interval": 1, "assigned_client_identifier": "a", "server_keep_alive": 5,
                          "response_information": "r", "server_reference": "s", "reason_string": "ok",
                          "receive_maximum": 3, "topic_alias_maximum": 2, "maximum_qos": 1, "retain_available": 1,
                          "maximum_packet_size": 9999, "wildcard_subscription_available": 1,
                          "subscription_identifier_available": 0, "shared_subscription_available": 1, **users}),
        Publish("a/b", b"payload", 0, True, False, None, {**message, "topic_alias": 3}),
        Publish("a/\u00e9", b"x" * 130, 1, False, True, 513, {"subscription_identifier": [1, 200_000]}),
        Publish("q/2", b"", 2, False, False, 65535),
        PubAck(1, 0x10, {"reason_string": "none", **users}),
        PubRec(2, 0x80),
        PubRel(3, 0x92, {"reason_string": "?"}),
        PubComp(4),
        Subscribe(5, [SubscriptionRequest("a/+", 1, True, True, 2), SubscriptionRequest("#", 2)],
                  {"subscription_identifier": 77, **users}),
        SubAck(5, [1, 0x80], {"reason_string": "half"}),
        Unsubscribe(6, ["a/+", "#"], users),
        UnsubAck(6, [0, 0x11], users),
        PingReq(),
        PingResp(),
        Disconnect(0x04, {"session_expiry_interval": 0, "reason_string": "bye", "server_reference": "x", **users}),
    ]
    if level == MQTT_5:
        items.append(Auth(0x18, {"authentication_method": "m", "authentication_data": b"d", **users}))
    return [encode(p, level) for p in items]


CORPUS = {level: corpus(level) for level in (MQTT_31, MQTT_311, MQTT_5)}


@st.composite
def corpus_sessions(draw: st.DrawFn) -> bytes:
    """A CONNECT and a few other corpus packets of one level, concatenated."""
    level = draw(st.sampled_from([MQTT_31, MQTT_311, MQTT_5]))
    rest = draw(st.lists(st.sampled_from(CORPUS[level][1:]), max_size=5))
    return b"".join([CORPUS[level][0], *rest])


def encode_all(level: int, items: list[Packet]) -> bytes:
    return b"".join(encode(p, level) for p in items)


def feed_in_pieces(decoder: Decoder, data: bytes, cuts: list[int]) -> list[Packet]:
    out: list[Packet] = []
    start = 0
    for cut in [*sorted(cuts), len(data)]:
        out.extend(decoder.feed(data[start:cut]))
        start = cut
    return out


def decode_outcome(decoder: Decoder, data: bytes, cuts: list[int]) -> tuple[list[Packet], int | None]:
    """Packets decoded before any error, and the error's reason code (None if none)."""
    out: list[Packet] = []
    start = 0
    try:
        for cut in [*sorted(cuts), len(data)]:
            out.extend(decoder.feed(data[start:cut]))
            start = cut
    except MQTTError as exc:
        return out + exc.packets, exc.reason_code
    return out, None


def raises(code: int, data: bytes, level: int | None = None) -> MQTTError:
    with pytest.raises(MQTTError) as info:
        Decoder(protocol_level=level).feed(data)
    assert info.value.reason_code == code, str(info.value)
    assert str(info.value)  # a reason a human can read in the log
    return info.value


def decode_one(data: bytes, level: int | None = None) -> Packet:
    result = Decoder(protocol_level=level).feed(data)
    assert len(result) == 1
    return result[0]


# ---------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("level", [MQTT_31, MQTT_311, MQTT_5])
@ROUND_TRIP
@given(data=st.data())
def test_connect_round_trip(level: int, data: st.DataObject) -> None:
    connect = data.draw(CONNECTS[level])
    decoder = Decoder()
    assert decoder.feed(encode(connect, level)) == [connect]
    assert decoder.protocol_level == level


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_packet_round_trip(level: int, data: st.DataObject) -> None:
    packet = data.draw(PACKETS[level])
    assert Decoder(protocol_level=level).feed(encode(packet, level)) == [packet]


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
@ROUND_TRIP
@given(data=st.data())
def test_encode_publish_matches_encode(level: int, data: st.DataObject) -> None:
    p = data.draw(publishes(level))
    props = encode_properties(p.properties) if p.properties and level == MQTT_5 else b""
    fast = encode_publish(p.topic.encode(), p.payload, p.qos, p.retain, p.dup, p.packet_id, level, props)
    assert fast == encode(p, level)


@pytest.mark.parametrize(
    ("value", "wire"),
    [  # the table of section 1.5.5 / 2.2.3
        (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (16_383, b"\xff\x7f"),
        (16_384, b"\x80\x80\x01"), (2_097_151, b"\xff\xff\x7f"), (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_bytes(value: int, wire: bytes) -> None:
    assert remaining_length_bytes(value) == wire


@pytest.mark.parametrize("value", [-1, 268_435_456])
def test_remaining_length_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        remaining_length_bytes(value)


def test_large_payload_uses_multibyte_remaining_length() -> None:
    packet = Publish("t", b"x" * 300_000, 1, packet_id=7)
    wire = encode(packet, MQTT_311)
    assert wire[1:4] == remaining_length_bytes(2 + 1 + 2 + 300_000)
    assert Decoder(protocol_level=MQTT_311).feed(wire) == [packet]


# ---------------------------------------------------------------------------- encoding per version


def test_311_encodings_omit_v5_fields() -> None:
    props = {"reason_string": "no"}
    assert encode(PubAck(5, 0x80, props), MQTT_311) == b"\x40\x02\x00\x05"
    assert encode(PubRel(5), MQTT_311) == b"\x62\x02\x00\x05"
    assert encode(UnsubAck(9, [0x11], props), MQTT_311) == b"\xb0\x02\x00\x09"
    assert encode(Disconnect(0x8E, props), MQTT_311) == b"\xe0\x00"
    assert encode(SubAck(1, [0, 1, 2, 0x80]), MQTT_311) == b"\x90\x06\x00\x01\x00\x01\x02\x80"
    assert encode(ConnAck(True, 0), MQTT_311) == b"\x20\x02\x01\x00"
    assert encode(Publish("a", b"p", properties={"content_type": "x"}), MQTT_311) == b"\x30\x04\x00\x01ap"


def test_v5_short_forms() -> None:
    # Section 3.4.2.1 / 3.14.2.1: reason code and properties may be left out when default.
    assert encode(PubAck(5), MQTT_5) == b"\x40\x02\x00\x05"
    assert encode(PubAck(5, 0x10), MQTT_5) == b"\x40\x03\x00\x05\x10"
    assert encode(Disconnect(), MQTT_5) == b"\xe0\x00"
    assert encode(Disconnect(0x04), MQTT_5) == b"\xe0\x01\x04"
    assert encode(Auth(), MQTT_5) == b"\xf0\x00"
    assert encode(ConnAck(False, 0), MQTT_5) == b"\x20\x03\x00\x00\x00"
    assert encode_properties({}) == b"\x00"


def test_connect_311_bytes() -> None:
    wire = encode(Connect("c", keepalive=60, username="u", password=b"p"), MQTT_311)
    assert wire == b"\x10\x13\x00\x04MQTT\x04\xc2\x00\x3c\x00\x01c\x00\x01u\x00\x01p"


def test_connect_31_defaults_protocol_name() -> None:
    wire = encode(Connect("c", protocol_level=MQTT_31))
    assert wire[2:10] == b"\x00\x06MQIsdp"
    assert decode_one(wire).protocol_name == "MQIsdp"


def test_encode_refuses_unencodable_values() -> None:
    with pytest.raises(ValueError):
        encode(Publish("t", b"", qos=1), MQTT_311)  # QoS 1 needs a packet id
    with pytest.raises(ValueError):
        encode(PubAck(70_000), MQTT_311)
    with pytest.raises(ValueError):
        encode(Publish("t" * 70_000, b""), MQTT_311)
    with pytest.raises(ValueError):
        encode_properties({"no_such_property": 1})
    with pytest.raises(ValueError):
        encode(Auth(), MQTT_311)


def test_publish_subscription_identifiers_are_a_list() -> None:
    wire = encode(Publish("t", b"", properties={"subscription_identifier": [1, 300]}), MQTT_5)
    assert decode_one(wire, MQTT_5).properties == {"subscription_identifier": [1, 300]}


# ---------------------------------------------------------------------------- streams


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(session=sessions(), data=st.data())
def test_stream_split_anywhere_gives_same_packets(session: tuple[int, list[Packet]], data: st.DataObject) -> None:
    level, items = session
    wire = encode_all(level, items)
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=12))
    assert feed_in_pieces(Decoder(), wire, cuts) == items


@settings(max_examples=50, deadline=None)
@given(session=sessions())
def test_stream_byte_by_byte(session: tuple[int, list[Packet]]) -> None:
    level, items = session
    wire = encode_all(level, items)
    assert feed_in_pieces(Decoder(), wire, list(range(len(wire)))) == items


def test_partial_packet_is_buffered() -> None:
    wire = encode(Publish("a/b", b"x" * 1000), MQTT_311)
    decoder = Decoder(protocol_level=MQTT_311)
    assert decoder.feed(wire[:1]) == []
    assert decoder.feed(wire[1:3]) == []
    assert decoder.feed(wire[3:500]) == []
    assert decoder.feed(wire[500:] + wire[:10]) == [Publish("a/b", b"x" * 1000)]
    assert decoder.feed(wire[10:]) == [Publish("a/b", b"x" * 1000)]


def test_bytearray_and_memoryview_input_give_bytes_payloads() -> None:
    wire = encode(Publish("a", b"payload"), MQTT_311)
    for chunk in (bytearray(wire), memoryview(wire)):
        (packet,) = Decoder(protocol_level=MQTT_311).feed(chunk)  # type: ignore[arg-type]
        assert isinstance(packet, Publish)
        assert type(packet.payload) is bytes


# ---------------------------------------------------------------------------- fuzzing


@pytest.mark.parametrize("level", [None, MQTT_311, MQTT_5])
@FUZZ
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes_decode_or_raise_mqtt_error(level: int | None, blob: bytes) -> None:
    try:
        Decoder(protocol_level=level).feed(blob)
    except MQTTError as exc:
        assert 0x80 <= exc.reason_code <= 0xFF


def _mutate(wire: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    buf = bytearray(wire)
    for kind, where, value in edits:
        i = where % (len(buf) + 1)
        if kind == 0 and i < len(buf):
            buf[i] ^= value or 1  # flip bits
        elif kind == 1:
            buf.insert(i, value)
        elif kind == 2 and i < len(buf):
            del buf[i]
    return bytes(buf)


EDITS = st.lists(st.tuples(st.integers(0, 2), st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)


@FUZZ
@given(stream=corpus_sessions(), edits=EDITS, data=st.data())
def test_mutated_streams_decode_or_raise_consistently(
    stream: bytes, edits: list[tuple[int, int, int]], data: st.DataObject
) -> None:
    wire = _mutate(stream, edits)
    whole = decode_outcome(Decoder(), wire, [])
    cuts = data.draw(st.lists(st.integers(0, len(wire)), max_size=8))
    # However the bytes are split, the decoder reaches the same packets and the same error.
    assert decode_outcome(Decoder(), wire, cuts) == whole


@pytest.mark.parametrize("level", [MQTT_311, MQTT_5])
@FUZZ
@given(data=st.data(), edits=EDITS)
def test_mutated_single_packets(level: int, data: st.DataObject, edits: list[tuple[int, int, int]]) -> None:
    seeds = st.sampled_from(CORPUS[level][1:]) | PACKETS[level].map(lambda p: encode(p, level))
    wire = _mutate(data.draw(seeds), edits)
    try:
        for packet in Decoder(protocol_level=level).feed(wire):
            # What decodes cleanly must survive its own round trip.
            assert Decoder(protocol_level=level).feed(encode(packet, level)) == [packet]
    except MQTTError:
        pass


def test_corpus_round_trips() -> None:
    for level, encoded in CORPUS.items():
        decoded = Decoder().feed(b"".join(encoded))
        assert [encode(p, level) for p in decoded] == encoded


# ---------------------------------------------------------------------------- spec violations

CONNECT_311 = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"  # clean session, keepalive 60, id ""


def connect_bytes(flags: int = 0x02, level: int = 4, name: bytes = b"MQTT", tail: bytes = b"\x00\x00") -> bytes:
    body = len(name).to_bytes(2, "big") + name + bytes((level, flags)) + b"\x00\x3c" + tail
    return bytes((0x10,)) + remaining_length_bytes(len(body)) + body


def test_valid_connect_bytes() -> None:
    assert connect_bytes() == CONNECT_311
    assert decode_one(CONNECT_311) == Connect("", MQTT_311, True, 60)
    assert decode_one(connect_bytes(level=3, name=b"MQIsdp")) == Connect("", MQTT_31, True, 60, protocol_name="MQIsdp")
    assert decode_one(connect_bytes(level=5, tail=b"\x00\x00\x00")) == Connect("", MQTT_5, True, 60)


class TestFixedHeader:
    def test_first_packet_must_be_connect(self) -> None:
        raises(PROTOCOL_ERROR, b"\xc0\x00")
        raises(PROTOCOL_ERROR, b"\x30\x03\x00\x01a")

    def test_first_byte_is_checked_before_the_rest_arrives(self) -> None:
        raises(PROTOCOL_ERROR, b"\x82")
        raises(MALFORMED, b"\x36", MQTT_311)

    def test_second_connect_is_protocol_error(self) -> None:
        raises(PROTOCOL_ERROR, CONNECT_311 + CONNECT_311)
        raises(PROTOCOL_ERROR, CONNECT_311, MQTT_311)  # client-side decoder never sees CONNECT

    @pytest.mark.parametrize(
        "wire",
        [
            b"\x11" + CONNECT_311[1:],  # CONNECT flags must be 0
            b"\x80\x06\x00\x01\x00\x01a\x00",  # SUBSCRIBE flags must be 0b0010
            b"\xa0\x05\x00\x01\x00\x01a",  # UNSUBSCRIBE flags must be 0b0010
            b"\x60\x02\x00\x01",  # PUBREL flags must be 0b0010
            b"\x42\x02\x00\x01",  # PUBACK flags must be 0
            b"\xc1\x00",  # PINGREQ flags must be 0
            b"\xe8\x00",  # DISCONNECT flags must be 0
            b"\x00\x00",  # type 0 is reserved
            b"\x36\x03\x00\x01a",  # PUBLISH QoS 3
            b"\xf0\x00",  # AUTH does not exist in 3.1.1
        ],
    )
    def test_reserved_bits(self, wire: bytes) -> None:
        level = None if wire[0] >> 4 == 1 else MQTT_311
        raises(MALFORMED, wire, level)

    def test_remaining_length_longer_than_four_bytes(self) -> None:
        raises(MALFORMED, b"\x30\xff\xff\xff\xff\x01", MQTT_311)
        raises(MALFORMED, b"\x30\x80\x80\x80\x80", MQTT_311)  # refused without a fifth byte

    def test_max_packet_size_from_header_alone(self) -> None:
        header = b"\x30" + remaining_length_bytes(10 * 1024 * 1024)
        raises(PACKET_TOO_LARGE, header, MQTT_311)
        raises(PACKET_TOO_LARGE, b"\x10" + remaining_length_bytes(10 * 1024 * 1024))

    def test_max_packet_size_counts_the_whole_packet(self) -> None:
        wire = encode(Publish("t", b"x" * 95), MQTT_311)  # 2 + 3 + 95 = 100 bytes
        assert len(wire) == 100
        assert Decoder(100, MQTT_311).feed(wire)
        with pytest.raises(MQTTError) as info:
            Decoder(99, MQTT_311).feed(wire[:2])
        assert info.value.reason_code == PACKET_TOO_LARGE

    def test_error_is_sticky_and_keeps_earlier_packets(self) -> None:
        decoder = Decoder(protocol_level=MQTT_311)
        with pytest.raises(MQTTError) as info:
            decoder.feed(b"\xc0\x00\xd0\x00\xc1\x00")
        assert info.value.packets == [PingReq(), PingResp()]
        with pytest.raises(MQTTError):
            decoder.feed(b"\xc0\x00")


class TestConnect:
    @pytest.mark.parametrize(
        ("level", "name"), [(6, b"MQTT"), (3, b"MQTT"), (4, b"MQIsdp"), (5, b"MQTX"), (0x84, b"MQTT")]
    )
    def test_unsupported_protocol(self, level: int, name: bytes) -> None:
        decoder = Decoder()
        with pytest.raises(MQTTError) as info:
            decoder.feed(connect_bytes(level=level, name=name))
        assert info.value.reason_code == UNSUPPORTED_PROTOCOL_VERSION
        assert decoder.protocol_level is None

    def test_reserved_connect_flag(self) -> None:
        raises(MALFORMED, connect_bytes(flags=0x03))

    @pytest.mark.parametrize("flags", [0x0A, 0x12, 0x22])  # will QoS 1, QoS 2, retain; no will flag
    def test_will_fields_without_will_flag(self, flags: int) -> None:
        raises(MALFORMED, connect_bytes(flags=flags))

    def test_will_qos_3(self) -> None:
        raises(MALFORMED, connect_bytes(flags=0x1E, tail=b"\x00\x00\x00\x01t\x00\x00"))

    def test_password_without_username(self) -> None:
        tail = b"\x00\x00\x00\x02pw"
        raises(MALFORMED, connect_bytes(flags=0x42, tail=tail))
        packet = decode_one(connect_bytes(flags=0x42, level=5, tail=b"\x00" + tail))
        assert isinstance(packet, Connect) and packet.password == b"pw" and packet.username is None

    def test_will_topic_with_wildcard(self) -> None:
        raises(PROTOCOL_ERROR, connect_bytes(flags=0x06, tail=b"\x00\x00\x00\x01#\x00\x00"))
        raises(TOPIC_NAME_INVALID, connect_bytes(flags=0x06, level=5, tail=b"\x00\x00\x00\x00\x00\x01#\x00\x00"))

    def test_trailing_bytes(self) -> None:
        raises(MALFORMED, connect_bytes(tail=b"\x00\x00\x00"))

    def test_level_known_after_a_bad_v5_connect(self) -> None:
        # The server answers a broken MQTT 5 CONNECT with a v5 CONNACK, so the level sticks.
        decoder = Decoder()
        with pytest.raises(MQTTError) as info:
            decoder.feed(connect_bytes(level=5, tail=b"\x02\x05\x00\x00\x00"))  # unknown property 0x05
        assert info.value.reason_code == MALFORMED
        assert decoder.protocol_level == MQTT_5

    def test_client_id_bad_utf8(self) -> None:
        raises(MALFORMED, connect_bytes(tail=b"\x00\x02\xc3\x28"))


class TestStrings:
    @pytest.mark.parametrize(
        "raw",
        [
            b"a\xffb",  # never valid in UTF-8
            b"\xc0\xaf",  # overlong encoding of '/'
            b"\xed\xa0\x80",  # UTF-16 surrogate U+D800
            b"a\x00b",  # U+0000
            b"\xe2\x82",  # truncated sequence
        ],
    )
    def test_bad_topic_strings(self, raw: bytes) -> None:
        body = len(raw).to_bytes(2, "big") + raw
        raises(MALFORMED, b"\x30" + bytes((len(body),)) + body, MQTT_311)

    def test_topic_with_wildcards(self) -> None:
        raises(PROTOCOL_ERROR, b"\x30\x05\x00\x03a/+", MQTT_311)
        raises(PROTOCOL_ERROR, b"\x30\x03\x00\x01#", MQTT_311)
        raises(TOPIC_NAME_INVALID, b"\x30\x06\x00\x03a/#\x00", MQTT_5)

    def test_empty_topic(self) -> None:
        raises(MALFORMED, b"\x30\x02\x00\x00", MQTT_311)
        # v5: allowed here; the server resolves it through the topic alias.
        packet = decode_one(b"\x30\x06\x00\x00\x03\x23\x00\x07", MQTT_5)
        assert packet == Publish("", b"", properties={"topic_alias": 7})

    def test_filter_with_bad_utf8(self) -> None:
        raises(MALFORMED, b"\x82\x06\x00\x01\x00\x01\xff\x00", MQTT_311)


class TestPacketIds:
    def test_publish_qos1_needs_nonzero_id(self) -> None:
        raises(PROTOCOL_ERROR, b"\x32\x05\x00\x01a\x00\x00", MQTT_311)
        raises(MALFORMED, b"\x32\x04\x00\x01a\x00", MQTT_311)  # id cut short

    @pytest.mark.parametrize("first", [0x40, 0x50, 0x62, 0x70, 0xB0])
    def test_acks_need_nonzero_id(self, first: int) -> None:
        raises(PROTOCOL_ERROR, bytes((first, 2, 0, 0)), MQTT_311)

    def test_subscribe_needs_nonzero_id(self) -> None:
        raises(PROTOCOL_ERROR, b"\x82\x06\x00\x00\x00\x01a\x00", MQTT_311)


class TestSubscribe:
    def test_no_filters(self) -> None:
        raises(PROTOCOL_ERROR, b"\x82\x02\x00\x01", MQTT_311)
        raises(PROTOCOL_ERROR, b"\x82\x03\x00\x01\x00", MQTT_5)
        raises(PROTOCOL_ERROR, b"\xa2\x02\x00\x01", MQTT_311)
        raises(PROTOCOL_ERROR, b"\xa2\x03\x00\x01\x00", MQTT_5)

    @pytest.mark.parametrize("options", [0x03, 0x04, 0x40, 0x80, 0xFC])
    def test_311_options_byte(self, options: int) -> None:
        raises(MALFORMED, b"\x82\x06\x00\x01\x00\x01a" + bytes((options,)), MQTT_311)

    @pytest.mark.parametrize("options", [0x40, 0x80, 0xC1])
    def test_v5_reserved_option_bits(self, options: int) -> None:
        raises(MALFORMED, b"\x82\x07\x00\x01\x00\x00\x01a" + bytes((options,)), MQTT_5)

    def test_v5_retain_handling_3_and_qos_3(self) -> None:
        # Section 3.8.3.1 names both a Protocol Error.
        raises(PROTOCOL_ERROR, b"\x82\x07\x00\x01\x00\x00\x01a\x30", MQTT_5)
        raises(PROTOCOL_ERROR, b"\x82\x07\x00\x01\x00\x00\x01a\x03", MQTT_5)

    def test_v5_options_decode(self) -> None:
        packet = decode_one(b"\x82\x07\x00\x01\x00\x00\x01a\x2e", MQTT_5)
        assert packet == Subscribe(1, [SubscriptionRequest("a", 2, True, True, 2)])

    def test_truncated_filter(self) -> None:
        raises(MALFORMED, b"\x82\x05\x00\x01\x00\x01a", MQTT_311)  # options byte missing
        raises(MALFORMED, b"\x82\x05\x00\x01\x00\x05a", MQTT_311)  # length runs past the end


class TestLeftoverBytes:
    @pytest.mark.parametrize(
        ("wire", "level"),
        [
            (b"\x40\x03\x00\x01\x00", MQTT_311),  # PUBACK is exactly two bytes in 3.1.1
            (b"\xb0\x03\x00\x01\x00", MQTT_311),  # UNSUBACK has no codes in 3.1.1
            (b"\xc0\x01\x00", MQTT_311),  # PINGREQ has no body
            (b"\xd0\x01\x00", MQTT_5),  # PINGRESP has no body
            (b"\xe0\x01\x00", MQTT_311),  # DISCONNECT has no body in 3.1.1
            (b"\x20\x03\x00\x00\x00", MQTT_311),  # CONNACK is two bytes in 3.1.1
            (b"\x40\x05\x00\x01\x00\x00\x00", MQTT_5),  # after PUBACK properties
            (b"\xe0\x03\x00\x00\x00", MQTT_5),  # after DISCONNECT properties
        ],
    )
    def test_leftover_is_malformed(self, wire: bytes, level: int) -> None:
        raises(MALFORMED, wire, level)

    def test_connack_reserved_flags(self) -> None:
        raises(MALFORMED, b"\x20\x02\x02\x00", MQTT_311)


class TestReasonCodes:
    @pytest.mark.parametrize(
        ("wire", "level"),
        [
            (b"\x40\x03\x00\x01\x01", MQTT_5),  # 0x01 is not a PUBACK reason code
            (b"\x62\x03\x00\x01\x80", MQTT_5),  # PUBREL allows only 0x00 and 0x92
            (b"\x90\x04\x00\x01\x00\x03", MQTT_5),  # SUBACK 0x03
            (b"\x90\x03\x00\x01\x81", MQTT_311),  # 3.1.1 SUBACK: 0, 1, 2, 0x80 only
            (b"\x90\x02\x00\x01", MQTT_311),  # SUBACK without codes
            (b"\xb0\x03\x00\x01\x00", MQTT_5),  # v5 UNSUBACK without codes
            (b"\x20\x02\x00\x06", MQTT_311),  # 3.1.1 CONNACK return codes stop at 5
            (b"\x20\x03\x00\x01\x00", MQTT_5),  # 0x01 is not a CONNACK reason code
            (b"\xe0\x01\x01", MQTT_5),
            (b"\xf0\x01\x01", MQTT_5),
        ],
    )
    def test_undefined_reason_code(self, wire: bytes, level: int) -> None:
        raises(PROTOCOL_ERROR, wire, level)

    def test_v5_ack_forms(self) -> None:
        assert decode_one(b"\x40\x02\x00\x01", MQTT_5) == PubAck(1)
        assert decode_one(b"\x40\x03\x00\x01\x10", MQTT_5) == PubAck(1, 0x10)
        assert decode_one(b"\x50\x04\x00\x01\x80\x00", MQTT_5) == PubRec(1, 0x80)
        assert decode_one(b"\xe0\x01\x04", MQTT_5) == Disconnect(0x04)
        assert decode_one(b"\xf0\x00", MQTT_5) == Auth()


def v5_publish_with(props: bytes) -> bytes:
    body = b"\x00\x01t" + remaining_length_bytes(len(props)) + props
    return b"\x30" + remaining_length_bytes(len(body)) + body


class TestProperties:
    def test_unknown_identifier(self) -> None:
        raises(MALFORMED, v5_publish_with(b"\x05\x00"), MQTT_5)
        raises(MALFORMED, v5_publish_with(b"\x80\x00"), MQTT_5)

    def test_not_allowed_on_packet_type(self) -> None:
        raises(MALFORMED, v5_publish_with(b"\x11\x00\x00\x00\x01"), MQTT_5)  # session expiry
        raises(MALFORMED, b"\x40\x06\x00\x01\x00\x02\x23\x00", MQTT_5)  # topic_alias on PUBACK
        raises(MALFORMED, b"\xa2\x07\x00\x01\x02\x0b\x01\x00\x00", MQTT_5)  # sub id on UNSUBSCRIBE

    def test_will_delay_only_in_will(self) -> None:
        raises(MALFORMED, v5_publish_with(b"\x18\x00\x00\x00\x01"), MQTT_5)
        will = Will("w", b"", properties={"will_delay_interval": 5})
        connect = Connect("c", MQTT_5, will=will)
        assert decode_one(encode(connect)) == connect
        bad = encode(Connect("c", MQTT_5, properties={"will_delay_interval": 5}))
        raises(MALFORMED, bad)

    def test_duplicates(self) -> None:
        raises(PROTOCOL_ERROR, v5_publish_with(b"\x03\x00\x01a\x03\x00\x01b"), MQTT_5)
        raises(PROTOCOL_ERROR, b"\x82\x0b\x00\x01\x04\x0b\x01\x0b\x02\x00\x01a\x00", MQTT_5)

    def test_repeatable_properties(self) -> None:
        props = b"\x26\x00\x01k\x00\x01v\x26\x00\x01k\x00\x01w\x0b\x01\x0b\x02"
        packet = decode_one(v5_publish_with(props), MQTT_5)
        assert packet.properties == {"user_property": [("k", "v"), ("k", "w")], "subscription_identifier": [1, 2]}

    def test_length_mismatch(self) -> None:
        # Declared length runs past the packet.
        raises(MALFORMED, b"\x30\x05\x00\x01t\x05\x01", MQTT_5)
        # A value straddles the declared property length (2 bytes declared, u32 needs 5).
        raises(MALFORMED, v5_publish_with(b"\x02\x00")[:-2] + b"\x02\x02\x00\x00\x00\x00\x01", MQTT_5)

    def test_bad_values(self) -> None:
        raises(PROTOCOL_ERROR, v5_publish_with(b"\x01\x02"), MQTT_5)  # payload format 2
        raises(TOPIC_ALIAS_INVALID, v5_publish_with(b"\x23\x00\x00"), MQTT_5)
        raises(PROTOCOL_ERROR, v5_publish_with(b"\x0b\x00"), MQTT_5)  # subscription id 0
        raises(PROTOCOL_ERROR, encode(ConnAck(properties={"receive_maximum": 0}), MQTT_5), MQTT_5)
        raises(PROTOCOL_ERROR, encode(ConnAck(properties={"maximum_packet_size": 0}), MQTT_5), MQTT_5)
        raises(PROTOCOL_ERROR, encode(ConnAck(properties={"maximum_qos": 2}), MQTT_5), MQTT_5)
        raises(PROTOCOL_ERROR, encode(Auth(0x18, {"authentication_data": b"x"}), MQTT_5), MQTT_5)

    def test_bad_utf8_in_property(self) -> None:
        raises(MALFORMED, v5_publish_with(b"\x03\x00\x01\xff"), MQTT_5)
        raises(MALFORMED, v5_publish_with(b"\x26\x00\x01k\x00\x01\x00"), MQTT_5)

    def test_property_varint_too_long(self) -> None:
        raises(MALFORMED, b"\x30\x08\x00\x01t\xff\xff\xff\xff\x01", MQTT_5)


# ---------------------------------------------------------------------------- issue 14: spec rules


def padded(value: int) -> bytes | None:
    """A non-minimal encoding of ``value`` (one more byte, a trailing zero), or None when the
    minimal one already takes four bytes."""
    wire = remaining_length_bytes(value)
    if len(wire) == 4:
        return None
    return wire[:-1] + bytes((wire[-1] | 0x80, 0))


class TestMinimalVarint:
    """MQTT-1.5.5-1: a variable byte integer uses the minimum number of bytes."""

    @given(st.integers(0, 268_435_455))
    @FUZZ
    def test_minimal_encodings_decode_and_padded_ones_are_refused(self, value: int) -> None:
        from zmesh.mqtt.properties import _read_varint

        wire = remaining_length_bytes(value)
        assert _read_varint(wire, 0, len(wire)) == (value, len(wire))
        other = padded(value)
        if other is not None:
            with pytest.raises(MQTTError) as info:
                _read_varint(other, 0, len(other))
            assert info.value.reason_code == MALFORMED

    @given(st.integers(0, 2_097_151), st.integers(0, 3))
    @FUZZ
    def test_padded_remaining_length_is_refused_from_the_header(self, length: int, ptype: int) -> None:
        first = (0x30, 0xC0, 0xE0, 0x40)[ptype]  # PUBLISH, PINGREQ, DISCONNECT, PUBACK
        other = padded(length)
        assert other is not None
        # Refused as soon as the header is complete, before any of the body arrives.
        raises(MALFORMED, bytes((first,)) + other, MQTT_311)

    def test_examples(self) -> None:
        raises(MALFORMED, b"\xc0\x80\x00", MQTT_311)  # PINGREQ, length 0 in two bytes
        raises(MALFORMED, b"\x30\x85\x00\x00\x01tab", MQTT_311)  # length 5 in two bytes
        raises(MALFORMED, v5_publish_with(b"\x0b\x81\x00"), MQTT_5)  # subscription identifier 1 in 2 bytes
        # The property length itself: 0 in two bytes.
        raises(MALFORMED, b"\x30\x05\x00\x01t\x80\x00", MQTT_5)


class TestIssue14Rules:
    def test_qos0_publish_with_dup_is_malformed(self) -> None:
        raises(MALFORMED, b"\x38\x03\x00\x01t", MQTT_311)  # MQTT-3.3.1-2
        raises(MALFORMED, b"\x38\x04\x00\x01t\x00", MQTT_5)
        assert decode_one(b"\x3a\x05\x00\x01t\x00\x07", MQTT_311).dup  # QoS 1 with DUP is fine

    @pytest.mark.parametrize("topic", [b"a/+", b"#", b"a/#", b""])
    def test_response_topic_must_be_a_topic_name(self, topic: bytes) -> None:
        prop = b"\x08" + len(topic).to_bytes(2, "big") + topic
        raises(PROTOCOL_ERROR, v5_publish_with(prop), MQTT_5)  # MQTT-3.3.2-14
        assert decode_one(v5_publish_with(b"\x08\x00\x03a/b"), MQTT_5).properties["response_topic"] == "a/b"
