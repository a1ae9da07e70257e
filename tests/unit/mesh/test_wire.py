"""The mesh envelope: round trips, prefix filtering, and fuzzed frames from a bad peer."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.mesh import wire

topics_st = st.text(
    alphabet=st.characters(blacklist_characters="\x00+#", blacklist_categories=("Cs",)), min_size=1, max_size=40
)
items_st = st.lists(
    st.tuples(
        st.binary(max_size=64),
        st.integers(0, 2),
        st.booleans(),
        st.integers(0, 2**63 - 1),
        st.one_of(st.none(), st.dictionaries(st.sampled_from(["content_type", "x"]), st.text(max_size=5), max_size=2)),
    ),
    min_size=1,
    max_size=20,
)


@given(topics_st, items_st)
def test_event_frame_round_trip(topic: str, items: list) -> None:
    encoded = [wire.encode_item(*item) for item in items]
    frame = wire.encode_event_frame(topic.encode(), encoded)
    got_topic, got_items, plain = wire.decode_event_frame(frame)
    assert got_topic == topic
    assert plain == all(type(i) is bytes for i in got_items)
    for (payload, qos, retain, ts, props), item in zip(items, got_items, strict=True):
        if type(item) is bytes:  # the bare form: nothing but the payload needed saying
            assert (item, qos, retain, props or None) == (payload, 0, False, None)
            continue
        assert (item.payload, item.qos, item.retain) == (payload, qos, retain)
        assert item.timestamp == ts and item.properties == (props or None)


def test_plain_qos0_message_travels_as_bare_payload() -> None:
    assert wire.encode_item(b"x", 0, False, 123, None) == b"x"
    assert wire.encode_item(b"x", 1, False, 123, None) == [b"x", 1, 123, None]
    assert wire.encode_item(b"", 0, True, 5, None) == [b"", wire.FLAG_RETAIN, 5, None]


@given(topics_st, topics_st)
def test_exact_prefix_never_matches_a_longer_topic(topic: str, other: str) -> None:
    prefix = wire.subscription_prefix(topic, exact=True)
    frame = wire.encode_event_frame(other.encode(), [b"p"])
    assert frame.startswith(prefix) == (other == topic)


def test_wildcard_prefix_matches_the_subtree() -> None:
    prefix = wire.subscription_prefix("a/", exact=False)
    assert wire.encode_event_frame(b"a/b", [b"p"]).startswith(prefix)
    assert not wire.encode_event_frame(b"b/a", [b"p"]).startswith(prefix)


@pytest.mark.parametrize(
    "frame, reason",
    [
        (b"no terminator", "terminator"),
        (b"\x00" + msgpack.packb([1, []]), "empty topic"),
        (b"t\x00\xc1", "undecodable"),
        (b"t\x00" + msgpack.packb([2, []]), "version 2"),
        (b"t\x00" + msgpack.packb({"a": 1}), "not \\[version"),
        (b"t\x00" + msgpack.packb([1, [[b"p", 3, 0, None]]]), "malformed event item"),
        (b"t\x00" + msgpack.packb([1, [[b"p", 1, "ts", None]]]), "malformed event item"),
        (b"\xff\xfe\x00" + msgpack.packb([1, []]), "undecodable"),
    ],
)
def test_bad_frames_raise_wire_error(frame: bytes, reason: str) -> None:
    with pytest.raises(wire.WireError, match=reason):
        wire.decode_event_frame(frame)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzzed_event_frames_raise_only_wire_error(data: bytes) -> None:
    try:
        wire.decode_event_frame(data)
    except wire.WireError:
        pass


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_fuzzed_control_messages_raise_only_wire_error(data: bytes) -> None:
    try:
        wire.decode_control(data)
    except wire.WireError:
        pass


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["t", "v", "n", "i", "pc", "pp", "pl", "h", "ps", "q", "rs", "r"]),
                       st.one_of(st.integers(-5, 70000), st.text(max_size=5), st.none(),
                                 st.lists(st.lists(st.one_of(st.text(max_size=3), st.integers(0, 70000)), max_size=4), max_size=3))))
def test_structurally_fuzzed_control_maps_raise_only_wire_error(body: dict) -> None:
    body.setdefault("t", "hello")
    try:
        wire.decode_control(msgpack.packb(body))
    except wire.WireError:
        pass


def test_hello_round_trip() -> None:
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"  # a Z85 public key (40 characters)
    hello = wire.Hello("a", wire.WIRE_VERSION, 42, 7100, 40000, 40001, None, ((key, "10.0.0.2", 7100),))
    message = wire.decode_control(wire.encode_control(wire.HELLO, hello))
    assert (message.kind, message.version, message.hello) == (wire.HELLO, wire.WIRE_VERSION, hello)


def test_hello_carries_the_retained_sequence_and_an_older_node_s_hello_reads_as_zero() -> None:
    hello = wire.Hello("a", wire.WIRE_VERSION, 42, 7100, 40000, 40001, retained_seq=17)
    decoded = wire.decode_control(wire.encode_control(wire.HELLO, hello)).hello
    assert decoded is not None and decoded.retained_seq == 17
    older = {"t": "hello", "v": wire.WIRE_VERSION, "n": "a", "i": 1, "pc": 7100, "pp": 40000, "pl": 40001}
    decoded = wire.decode_control(msgpack.packb(older)).hello
    assert decoded is not None and decoded.retained_seq == 0


@pytest.mark.parametrize("bad", [-1, "3", 1.5, None, [1]])
def test_a_bad_retained_sequence_in_a_hello_is_a_wire_error(bad: object) -> None:
    body = {"t": "hello", "v": wire.WIRE_VERSION, "n": "a", "i": 1, "pc": 7100, "pp": 40000, "pl": 40001, "rs": bad}
    with pytest.raises(wire.WireError, match="retained sequence"):
        wire.decode_control(msgpack.packb(body))


def test_other_version_decodes_so_it_can_be_refused() -> None:
    data = msgpack.packb({"t": "hello", "v": 99, "n": "x"})
    message = wire.decode_control(data)
    assert message.version == 99 and message.hello is None


KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


@pytest.mark.parametrize("changes", [
    {"h": "not a host!"}, {"h": "tcp://x"}, {"h": ""}, {"h": "a" * 300}, {"h": "1.2.3.4:5"}, {"h": 5},
    {"ps": [[KEY, "no such host!", 7000]]}, {"ps": [["short", "10.0.0.1", 7000]]},
    {"ps": [[KEY, "10.0.0.1", 7000]] * (wire.MAX_HELLO_PEERS + 1)},
    {"n": "bad name"}, {"n": "x" * 65}, {"q": [["a/+", 1]]}, {"q": [["", 1]]}
])
def test_a_hello_that_names_what_cannot_be_dialled_or_named_is_a_bad_hello(changes: dict[str, object]) -> None:
    body = {"t": "hello", "v": wire.WIRE_VERSION, "n": "a", "i": 1, "pc": 7100, "pp": 40000, "pl": 40001}
    body.update(changes)
    with pytest.raises(wire.WireError) as caught:
        wire.decode_control(msgpack.packb(body))
    assert caught.value.reason == "mesh_bad_hello"


@pytest.mark.parametrize("host", ["10.0.0.2", "::1", "fe80::1", "zmesh-0.zmesh.default.svc.cluster.local", "node_1", "localhost."])
def test_a_hello_host_may_be_an_address_or_a_host_name(host: str) -> None:
    hello = wire.Hello("a", wire.WIRE_VERSION, 42, 7100, 40000, 40001, host, ((KEY, host, 7100),))
    assert wire.decode_control(wire.encode_control(wire.HELLO, hello)).hello == hello


def test_sync_chunks_are_bounded_by_count_and_bytes() -> None:
    from zmesh.retained.lastvalue import RetainedEntry

    small = [RetainedEntry(f"t/{i}", b"x", 0, "a", i) for i in range(5000)]
    assert [len(c) for c in wire.sync_chunks(small)] == [2000, 2000, 1000]
    big = [RetainedEntry(f"t/{i}", b"x" * 100_000, 0, "a", i) for i in range(10)]
    chunks = wire.sync_chunks(big)
    assert sum(len(c) for c in chunks) == 10 and max(len(c) for c in chunks) <= 3
    assert wire.sync_chunks([]) == [[]]
