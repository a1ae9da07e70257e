"""The wire of reliable delivery: round trips, and hostile bytes that must cost exactly one
``StreamWireError`` (never another exception, never a half-decoded value)."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.mesh import streamwire as sw
from zmesh.mesh import wire

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # 40 z85 characters
assert len(KEY) == sw.KEY_LEN

topics_st = st.text(
    alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), min_size=1, max_size=30
)
properties_st = st.one_of(
    st.none(),
    st.builds(lambda c: {"content_type": c}, st.text(max_size=4)),
    st.builds(lambda i, u: {"message_expiry_interval": i, "user_property": u},
              st.integers(0, 2**32 - 1), st.lists(st.tuples(st.text(max_size=3), st.text(max_size=3)).map(list),
                                                  max_size=2)),
    st.just({"payload_format_indicator": 1, "correlation_data": b"c", "response_topic": "r"}),
)
entries_st = st.lists(
    st.builds(sw.StreamEntry, topics_st, st.binary(max_size=64), st.sampled_from([1, 2]),
              st.integers(0, sw.MAX_INT), properties_st),
    min_size=1,
    max_size=8,
)
epoch_st = st.integers(1, sw.MAX_INT)
seq_st = st.integers(1, 2**62)


@given(epoch_st, seq_st, entries_st)
def test_stream_frame_round_trip(epoch: int, first: int, entries: list[sw.StreamEntry]) -> None:
    frame = sw.encode_frame(KEY, epoch, first, entries)
    assert frame.startswith(sw.subscription(KEY))  # what the SUB subscribes to
    assert sw.decode_frame(frame, KEY) == sw.StreamFrame(KEY, epoch, first, entries)


def test_stream_frames_are_neither_topics_nor_retained_nor_control() -> None:
    frame = sw.encode_frame(KEY, 1, 1, [sw.StreamEntry("a", b"x", 1, 0, None)])
    with pytest.raises(UnicodeDecodeError):
        frame[:1].decode()  # 0xFF never starts UTF-8, so never a topic
    assert frame[:1] != wire.RETAINED_CHANNEL
    control = sw.encode_ack(1, 1)
    with pytest.raises(wire.WireError):
        wire.decode_control(control)  # today's control decoder refuses it: dispatch by tag first


def test_a_frame_for_another_node_is_refused() -> None:
    frame = sw.encode_frame(KEY, 1, 1, [sw.StreamEntry("a", b"x", 1, 0, None)])
    other = "0" * 40
    with pytest.raises(sw.StreamWireError, match="another node"):
        sw.decode_frame(frame, other)


control_st = st.one_of(
    st.builds(sw.Ack, epoch_st, st.integers(0, sw.MAX_INT)),
    st.builds(lambda e, f, n: sw.Nack(e, f, f + n), epoch_st, seq_st, st.integers(0, 65_535)),
    st.builds(sw.Repair, epoch_st, seq_st, entries_st),
    st.builds(lambda e, f, n, r, c: sw.Gone(e, f, f + n if r != sw.GONE_EPOCH else 0, r, c),
              epoch_st, seq_st, st.integers(1, 1000), st.sampled_from([sw.GONE_ACKED, sw.GONE_EVICTED, sw.GONE_EPOCH]),
              st.integers(0, sw.MAX_INT)),
    st.builds(sw.Tail, epoch_st, st.integers(0, sw.MAX_INT), st.booleans()),
    st.builds(sw.Interest, epoch_st, st.dictionaries(
        st.binary(max_size=20).filter(lambda p: p[:1] not in (b"\xff", b"\xfe", b"\x00") and b"\x00" not in p),
        st.integers(0, sw.MAX_INT), max_size=5)),
    st.builds(sw.InterestOk, epoch_st),
    st.builds(lambda a, n: sw.Uncovered(a, a + n), st.integers(0, 2**62 - 1), st.integers(0, 2**62 - 1)),
)


@given(control_st)
def test_control_round_trip(message: sw.Control) -> None:
    assert sw.decode_control(sw.encode_control(message)) == message


def _refused(data: bytes, decode: object) -> None:
    try:
        decode(data)  # type: ignore[operator]
    except sw.StreamWireError:
        return
    # Random bytes may, rarely, be a valid message: then it must be a fully typed one.


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_cost_one_error_type(data: bytes) -> None:
    _refused(sw.STREAM_TAG + KEY.encode() + data, lambda d: sw.decode_frame(d, KEY))
    _refused(sw.CONTROL_TAG + data, sw.decode_control)
    _refused(data, sw.decode_control)
    _refused(data, sw.decode_frame)


# Values of every msgpack kind, nested a little: what a hostile peer may put in any field.
hostile_st = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
              st.text(max_size=5), st.binary(max_size=5)),
    lambda inner: st.one_of(st.lists(inner, max_size=6), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=400)
@given(st.lists(hostile_st, max_size=8))
def test_structured_garbage_costs_one_error_type(body: list) -> None:
    packed = msgpack.packb(body, use_bin_type=True)
    _refused(sw.CONTROL_TAG + packed, sw.decode_control)
    _refused(sw.STREAM_TAG + KEY.encode() + packed, lambda d: sw.decode_frame(d, KEY))


@settings(max_examples=300)
@given(epoch_st, seq_st, entries_st, st.data())
def test_a_valid_frame_with_one_field_replaced_is_refused_or_still_typed(
    epoch: int, first: int, entries: list[sw.StreamEntry], data: st.DataObject
) -> None:
    body = [sw.VERSION, epoch, first, [sw.encode_entry(e) for e in entries]]
    where = data.draw(st.sampled_from(["version", "epoch", "first", "topic", "payload", "qos", "ts", "props"]))
    value = data.draw(hostile_st)
    row = body[3][0]
    index = {"topic": 0, "payload": 1, "qos": 2, "ts": 3, "props": 4}
    if where in index:
        row[index[where]] = value
    else:
        body[{"version": 0, "epoch": 1, "first": 2}[where]] = value
    frame = sw.STREAM_TAG + KEY.encode() + msgpack.packb(body, use_bin_type=True)
    try:
        decoded = sw.decode_frame(frame, KEY)
    except sw.StreamWireError:
        return
    # Accepted: then every field is of its type and in its range.
    assert 1 <= decoded.epoch <= sw.MAX_INT and 1 <= decoded.first <= sw.MAX_INT
    for entry in decoded.entries:
        assert type(entry.topic) is str and entry.topic and "\x00" not in entry.topic
        assert type(entry.payload) is bytes and entry.qos in (1, 2)
        assert type(entry.timestamp) is int and 0 <= entry.timestamp <= sw.MAX_INT
        assert entry.properties is None or set(entry.properties) <= sw.MESSAGE_PROPERTIES


@pytest.mark.parametrize(
    "body",
    [
        [sw.VERSION, sw.ACK, True, 1],  # a bool is not an integer
        [sw.VERSION, sw.ACK, 0, 1],  # epoch 0 is "none"
        [sw.VERSION, sw.ACK, 1, -1],
        [sw.VERSION, sw.ACK, 1, 2**63],  # past int64
        [sw.VERSION, sw.ACK, 1],  # arity
        [sw.VERSION, sw.ACK, 1, 1, 1],
        [sw.VERSION + 1, sw.ACK, 1, 1],
        [sw.VERSION, sw.NACK, 1, 5, 4],  # last before first
        [sw.VERSION, sw.NACK, 1, 1, 1 + 65_536],  # more than max_range
        [sw.VERSION, sw.GONE, 1, 5, 5, sw.GONE_EVICTED, 1],  # ends before it starts
        [sw.VERSION, sw.GONE, 1, 5, 9, 7, 1],  # unknown reason
        [sw.VERSION, sw.TAIL, 1, 1, 1],  # final is not a bool
        [sw.VERSION, 99, 1, 1],
        [sw.VERSION, sw.REPAIR, 1, 1, []],  # no entries
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"", 0, 0, None]]],  # QoS 0 never in a stream
        [sw.VERSION, sw.REPAIR, 1, 1, [["t\x00u", b"", 1, 0, None]]],
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", "text", 1, 0, None]]],  # payload not bytes
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"", 1, 0, {"subscription_identifier": 1}]]],
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"", 1, 0, {"user_property": [["a"]]}]]],
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"", 1, 0, {"message_expiry_interval": 2**32}]]],
        [sw.VERSION, sw.REPAIR, 1, 2**63 - 1, [["t", b"", 1, 0, None]] * 2],  # runs past int64
        [sw.VERSION, sw.INTEREST, 1, [[b"a/", 0], [b"a/", 1]]],  # repeated
        [sw.VERSION, sw.INTEREST, 1, [[b"\x00", 0]]],  # the retained channel: every node's anyway
        [sw.VERSION, sw.INTEREST, 1, [[b"\xff" + b"k" * 40, 0]]],  # another node's stream
        [sw.VERSION, sw.INTEREST, 1, [[b"a\x00b", 0]]],
        [sw.VERSION, sw.INTEREST, 1, [[b"a" * 257, 0]]],
        [sw.VERSION, sw.INTEREST, 1, [["a/", 0]]],  # text, not bytes
        [sw.VERSION, sw.INTEREST, 1, [[b"a/%d" % i, 0] for i in range(1025)]],
        [sw.VERSION, sw.INTEREST_OK, 0],
        [sw.VERSION, sw.UNCOVERED, 10, 9],  # ends before it starts
    ],
)
def test_control_bounds(body: list) -> None:
    with pytest.raises(sw.StreamWireError):
        sw.decode_control(sw.CONTROL_TAG + msgpack.packb(body, use_bin_type=True))


def test_size_bounds() -> None:
    limits = sw.Limits(max_frame_bytes=1000, max_entries=4, max_topic_bytes=10, max_properties=2,
                       max_property_items=2)
    entry = ["t", b"", 1, 0, None]
    ok = sw.CONTROL_TAG + msgpack.packb([sw.VERSION, sw.REPAIR, 1, 1, [entry] * 4])
    assert len(sw.decode_control(ok, limits).entries) == 4
    for body in (
        [sw.VERSION, sw.REPAIR, 1, 1, [entry] * 5],
        [sw.VERSION, sw.REPAIR, 1, 1, [["é" * 6, b"", 1, 0, None]]],  # 12 bytes of UTF-8
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"x" * 1000, 1, 0, None]]],
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"", 1, 0, {"user_property": [["a", "b"]] * 3}]]],
        [sw.VERSION, sw.REPAIR, 1, 1, [["t", b"", 1, 0, {"content_type": "a", "response_topic": "b",
                                                         "correlation_data": b""}]]],
    ):
        with pytest.raises(sw.StreamWireError):
            sw.decode_control(sw.CONTROL_TAG + msgpack.packb(body, use_bin_type=True), limits)


def test_extension_types_and_deep_nesting_are_refused() -> None:
    ext = msgpack.packb([sw.VERSION, sw.ACK, msgpack.ExtType(5, b"x"), 1])
    with pytest.raises(sw.StreamWireError):
        sw.decode_control(sw.CONTROL_TAG + ext)
    deep = b"\x91" * 100_000 + b"\xc0"  # [[[[...None...]]]]: the unpacker's stack limit
    with pytest.raises(sw.StreamWireError):
        sw.decode_control(sw.CONTROL_TAG + deep)
    with pytest.raises(sw.StreamWireError):
        sw.decode_frame(sw.STREAM_TAG + KEY.encode() + deep, KEY)


def test_the_error_is_a_wire_error() -> None:
    # The mesh's existing handlers catch wire.WireError: one except clause covers both.
    assert issubclass(sw.StreamWireError, wire.WireError)
