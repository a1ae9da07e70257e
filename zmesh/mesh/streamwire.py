"""The wire of reliable delivery (docs/delivery.md): numbered stream frames on the data
path and the small control messages that acknowledge, recover and report them. Pure:
bytes in, values out.

Kept apart from ``zmesh.mesh.wire`` on purpose: that module is the envelope every node
speaks today, and these messages are new. Both tags below are bytes that neither of
today's formats can start with, so a node dispatches on the first byte before it decodes:

* **Stream frames** (data path, origin -> one destination)::

      0xFF | destination key (40 z85 characters) | msgpack([VERSION, epoch, first, entries])

  0xFF never occurs in UTF-8, so it never starts a topic and never collides with the
  retained channel (0x00). A SUB subscribes to ``0xFF + its own key``: on a shared PUB
  ZeroMQ's prefix filter delivers each frame to its one destination only, and on the
  per-destination sockets of the cluster-scale design the prefix costs one comparison.
  ``entries`` are consecutive: the first has sequence number ``first``, the next
  ``first + 1``, and so on, so no entry carries its own number. An entry is
  ``[topic, payload, qos, timestamp_ms, properties-or-None]``; QoS is 1 or 2 (QoS 0 never
  enters a stream) and retained writes keep their own channel.

* **Control messages** (control path, either direction)::

      0xFE | msgpack([VERSION, kind, ...])

  0xFE is a negative fixint in msgpack, never the map every ``wire`` control message is.
  ``ACK`` (receiver -> origin): everything up to ``upto`` is delivered. ``NACK``: send
  ``first..last`` again. ``REPAIR`` (the answer): entries from ``first``. ``GONE`` (the
  other answer): ``first..resume_at - 1`` cannot be sent, and why (acknowledged already,
  evicted, or the whole epoch is unknown). ``TAIL`` (origin -> receiver): "I have sent up
  to ``last``", which reveals a lost last frame; ``final`` on a clean stop.

The sender of any of these is known from the authenticated connection (CURVE), never
from the message. Everything a peer sends is hostile input: every field is type- and
range-checked, every list and string is bounded (``Limits``), and every failure raises
``StreamWireError`` (a ``wire.WireError``), nothing else, before any state changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from zmesh.mesh.wire import WireError

VERSION = 1
STREAM_TAG = b"\xff"
CONTROL_TAG = b"\xfe"
KEY_LEN = 40  # a z85-encoded CURVE public key
MAX_INT = 2**63 - 1  # epochs, sequence numbers and timestamps are non-negative int64

ACK, NACK, REPAIR, GONE, TAIL, INTEREST, INTEREST_OK, UNCOVERED = 1, 2, 3, 4, 5, 6, 7, 8
# Why a GONE range is gone. ACKED: the destination (perhaps an earlier life of it)
# acknowledged it, so it is no loss. EVICTED: the outbox dropped it (bounds). EPOCH: the
# origin holds nothing of that epoch (it restarted without a disk outbox).
GONE_ACKED, GONE_EVICTED, GONE_EPOCH = 0, 1, 2

# The properties a message may carry (MQTT 5, section 3.3.2.3); subscription identifiers
# are the receiving node's business and never travel.
MESSAGE_PROPERTIES = frozenset(
    {"payload_format_indicator", "message_expiry_interval", "content_type", "response_topic",
     "correlation_data", "user_property"}
)

_Z85 = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


class StreamWireError(WireError):
    """A stream frame or delivery control message that is malformed or out of bounds."""


@dataclass(frozen=True)
class Limits:
    """Bounds on what a peer may send; the defaults suit the defaults of docs/delivery.md."""

    max_frame_bytes: int = 16 * 1024 * 1024
    max_entries: int = 1024  # entries per stream frame or repair
    max_range: int = 65_536  # sequence numbers one NACK may ask for
    max_topic_bytes: int = 65_535  # MQTT's own limit
    max_properties: int = 16  # distinct property names per message
    max_property_items: int = 256  # user properties per message
    max_prefixes: int = 1024  # per interest declaration (the cluster-scale design's bound)
    max_prefix_bytes: int = 256


DEFAULT_LIMITS = Limits()


class StreamEntry(NamedTuple):
    """One message of a stream, as it travels."""

    topic: str
    payload: bytes
    qos: int
    timestamp: int  # wall-clock milliseconds at the origin when it was published
    properties: dict[str, Any] | None


class StreamFrame(NamedTuple):
    dest: str
    epoch: int
    first: int
    entries: list[StreamEntry]


class Ack(NamedTuple):
    epoch: int
    upto: int


class Nack(NamedTuple):
    epoch: int
    first: int
    last: int


class Repair(NamedTuple):
    epoch: int
    first: int
    entries: list[StreamEntry]


class Gone(NamedTuple):
    epoch: int
    first: int
    resume_at: int  # the first sequence number still available; 0 with GONE_EPOCH
    reason: int
    current_epoch: int  # the origin's epoch for this destination now (0: none)


class Tail(NamedTuple):
    epoch: int
    last: int
    final: bool


class Interest(NamedTuple):
    seq: int  # grows with every change; the origin applies only a newer one
    prefixes: dict[bytes, int]  # ZeroMQ prefix -> wall-clock ms it was first subscribed at


class InterestOk(NamedTuple):
    seq: int


class Uncovered(NamedTuple):
    since_ms: int
    until_ms: int


Control = Ack | Nack | Repair | Gone | Tail | Interest | InterestOk | Uncovered

_pack = msgpack.Packer(use_bin_type=True).pack


# ---------------------------------------------------------------------------- encoding


def subscription(own_key: str) -> bytes:
    """The SUB prefix under which a node receives the stream frames addressed to it."""
    return STREAM_TAG + own_key.encode()


def encode_entry(entry: StreamEntry) -> list[Any]:
    return [entry.topic, entry.payload, entry.qos, entry.timestamp, entry.properties or None]


def encode_frame(dest: str, epoch: int, first: int, entries: list[StreamEntry]) -> bytes:
    return STREAM_TAG + dest.encode() + _pack([VERSION, epoch, first, [encode_entry(e) for e in entries]])


def encode_ack(epoch: int, upto: int) -> bytes:
    return CONTROL_TAG + _pack([VERSION, ACK, epoch, upto])


def encode_nack(epoch: int, first: int, last: int) -> bytes:
    return CONTROL_TAG + _pack([VERSION, NACK, epoch, first, last])


def encode_repair(epoch: int, first: int, entries: list[StreamEntry]) -> bytes:
    return CONTROL_TAG + _pack([VERSION, REPAIR, epoch, first, [encode_entry(e) for e in entries]])


def encode_gone(epoch: int, first: int, resume_at: int, reason: int, current_epoch: int) -> bytes:
    return CONTROL_TAG + _pack([VERSION, GONE, epoch, first, resume_at, reason, current_epoch])


def encode_tail(epoch: int, last: int, final: bool = False) -> bytes:
    return CONTROL_TAG + _pack([VERSION, TAIL, epoch, last, final])


def encode_interest(seq: int, prefixes: dict[bytes, int]) -> bytes:
    return CONTROL_TAG + _pack([VERSION, INTEREST, seq, [[p, t] for p, t in sorted(prefixes.items())]])


def encode_interest_ok(seq: int) -> bytes:
    return CONTROL_TAG + _pack([VERSION, INTEREST_OK, seq])


def encode_uncovered(since_ms: int, until_ms: int) -> bytes:
    return CONTROL_TAG + _pack([VERSION, UNCOVERED, since_ms, until_ms])


def encode_control(message: Control) -> bytes:
    if isinstance(message, Uncovered):
        return encode_uncovered(*message)
    if isinstance(message, Interest):
        return encode_interest(*message)
    if isinstance(message, InterestOk):
        return encode_interest_ok(*message)
    if isinstance(message, Ack):
        return encode_ack(*message)
    if isinstance(message, Nack):
        return encode_nack(*message)
    if isinstance(message, Repair):
        return encode_repair(*message)
    if isinstance(message, Gone):
        return encode_gone(*message)
    return encode_tail(*message)


# ---------------------------------------------------------------------------- decoding


def _no_ext(code: int, data: bytes) -> Any:
    raise StreamWireError("msgpack extension types are not allowed")


def _unpack(data: bytes | memoryview, limits: Limits) -> Any:
    if len(data) > limits.max_frame_bytes:
        raise StreamWireError(f"{len(data)} bytes: more than {limits.max_frame_bytes}")
    try:
        # Every max_*_len is bounded by len(data) already; the checks below bound the rest.
        return msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext, timestamp=0)
    except StreamWireError:
        raise
    except Exception as exc:  # hostile bytes: any failure of the unpacker is one error type
        raise StreamWireError(f"undecodable: {type(exc).__name__}") from None


def _int(value: Any, low: int, what: str) -> int:
    if type(value) is not int or not low <= value <= MAX_INT:
        raise StreamWireError(f"{what} is not an integer in {low}..2^63-1")
    return value


def _properties(raw: Any, limits: Limits) -> dict[str, Any] | None:
    if raw is None:
        return None
    if type(raw) is not dict or not raw or len(raw) > limits.max_properties:
        raise StreamWireError("properties are not a small non-empty map")
    for name, value in raw.items():
        if name not in MESSAGE_PROPERTIES:
            raise StreamWireError("a property that no message carries")
        if name == "user_property":
            if not (
                type(value) is list
                and len(value) <= limits.max_property_items
                and all(type(p) is list and len(p) == 2 and type(p[0]) is str and type(p[1]) is str for p in value)
            ):
                raise StreamWireError("user properties are not a list of [name, value] strings")
        elif name in ("payload_format_indicator",):
            if type(value) is not int or value not in (0, 1):
                raise StreamWireError("payload format indicator is not 0 or 1")
        elif name == "message_expiry_interval":
            if type(value) is not int or not 0 <= value < 2**32:
                raise StreamWireError("message expiry interval is not a 32-bit unsigned integer")
        elif name == "correlation_data":
            if type(value) is not bytes:
                raise StreamWireError("correlation data is not bytes")
        elif type(value) is not str:  # content_type, response_topic
            raise StreamWireError(f"{name} is not a string")
    return raw


def _entries(raw: Any, limits: Limits) -> list[StreamEntry]:
    if type(raw) is not list or not raw or len(raw) > limits.max_entries:
        raise StreamWireError(f"entries are not a list of 1..{limits.max_entries}")
    entries = []
    for item in raw:
        if type(item) is not list or len(item) != 5:
            raise StreamWireError("an entry is not [topic, payload, qos, timestamp, properties]")
        topic, payload, qos, timestamp, properties = item
        if (
            type(topic) is not str
            or not topic
            or "\x00" in topic
            or len(topic) * 4 > limits.max_topic_bytes and len(topic.encode()) > limits.max_topic_bytes
        ):
            raise StreamWireError("entry topic is empty, too long or has a NUL")
        if type(payload) is not bytes:
            raise StreamWireError("entry payload is not bytes")
        if type(qos) is not int or qos not in (1, 2):
            raise StreamWireError("entry QoS is not 1 or 2")
        entries.append(StreamEntry(topic, payload, qos, _int(timestamp, 0, "entry timestamp"),
                                   _properties(properties, limits)))
    return entries


def _prefixes(raw: Any, limits: Limits) -> dict[bytes, int]:
    if type(raw) is not list or len(raw) > limits.max_prefixes:
        raise StreamWireError(f"interest is not a list of at most {limits.max_prefixes} prefixes")
    prefixes: dict[bytes, int] = {}
    for item in raw:
        if not (type(item) is list and len(item) == 2 and type(item[0]) is bytes):
            raise StreamWireError("an interest is not [prefix, since]")
        prefix = item[0]
        # A prefix is a topic's literal start (maybe empty: "#"), closed by NUL when exact:
        # never a stream or retained channel tag, never longer than the bound.
        if len(prefix) > limits.max_prefix_bytes or prefix[:1] in (STREAM_TAG, CONTROL_TAG, b"\x00"):
            raise StreamWireError("interest prefix too long or on a reserved channel")
        if b"\x00" in prefix[:-1] or prefix in prefixes:
            raise StreamWireError("interest prefix has an inner NUL or is repeated")
        prefixes[prefix] = _int(item[1], 0, "interest time")
    return prefixes


def decode_frame(frame: bytes, own_key: str | None = None, limits: Limits = DEFAULT_LIMITS) -> StreamFrame:
    """A stream frame; with ``own_key``, one addressed to anyone else is refused too."""
    if frame[:1] != STREAM_TAG or len(frame) < 1 + KEY_LEN:
        raise StreamWireError("not a stream frame")
    raw_key = frame[1 : 1 + KEY_LEN]
    if not _Z85.issuperset(raw_key):
        raise StreamWireError("stream frame destination is not a z85 key")
    dest = raw_key.decode("ascii")
    if own_key is not None and dest != own_key:
        raise StreamWireError("stream frame addressed to another node")
    body = _unpack(memoryview(frame)[1 + KEY_LEN :], limits)
    if type(body) is not list or len(body) != 4 or body[0] != VERSION or type(body[0]) is not int:
        raise StreamWireError("stream body is not [version, epoch, first, entries] of our version")
    epoch = _int(body[1], 1, "epoch")
    first = _int(body[2], 1, "first sequence number")
    entries = _entries(body[3], limits)
    if first + len(entries) - 1 > MAX_INT:
        raise StreamWireError("sequence numbers run past 2^63-1")
    return StreamFrame(dest, epoch, first, entries)


def decode_control(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Control:
    """One delivery control message (``data`` starts with CONTROL_TAG)."""
    if data[:1] != CONTROL_TAG:
        raise StreamWireError("not a delivery control message")
    body = _unpack(memoryview(data)[1:], limits)
    if type(body) is not list or len(body) < 3 or type(body[0]) is not int or body[0] != VERSION:
        raise StreamWireError("control body is not [version, kind, ...] of our version")
    kind, epoch = body[1], body[2]
    if type(kind) is not int:
        raise StreamWireError("control kind is not an integer")
    if kind == INTEREST and len(body) == 4:
        return Interest(_int(body[2], 1, "interest sequence number"), _prefixes(body[3], limits))
    if kind == INTEREST_OK and len(body) == 3:
        return InterestOk(_int(body[2], 1, "interest sequence number"))
    if kind == UNCOVERED and len(body) == 4:
        since = _int(body[2], 0, "uncovered start")
        return Uncovered(since, _int(body[3], since, "uncovered end"))
    if kind == ACK and len(body) == 4:
        return Ack(_int(epoch, 1, "epoch"), _int(body[3], 0, "acknowledged sequence number"))
    if kind == NACK and len(body) == 5:
        first = _int(body[3], 1, "first sequence number")
        last = _int(body[4], first, "last sequence number")
        if last - first >= limits.max_range:
            raise StreamWireError(f"recovery range of more than {limits.max_range}")
        return Nack(_int(epoch, 1, "epoch"), first, last)
    if kind == REPAIR and len(body) == 5:
        first = _int(body[3], 1, "first sequence number")
        entries = _entries(body[4], limits)
        if first + len(entries) - 1 > MAX_INT:
            raise StreamWireError("sequence numbers run past 2^63-1")
        return Repair(_int(epoch, 1, "epoch"), first, entries)
    if kind == GONE and len(body) == 7:
        first = _int(body[3], 1, "first sequence number")
        reason = body[5]
        if type(reason) is not int or reason not in (GONE_ACKED, GONE_EVICTED, GONE_EPOCH):
            raise StreamWireError("unknown reason for a gone range")
        resume_at = _int(body[4], 0, "resume point")
        if reason != GONE_EPOCH and resume_at <= first:
            raise StreamWireError("a gone range that ends before it starts")
        return Gone(_int(epoch, 1, "epoch"), first, resume_at, reason, _int(body[6], 0, "current epoch"))
    if kind == TAIL and len(body) == 5:
        if type(body[4]) is not bool:
            raise StreamWireError("tail final flag is not a boolean")
        return Tail(_int(epoch, 1, "epoch"), _int(body[3], 0, "last sequence number"), body[4])
    raise StreamWireError("unknown control kind or wrong arity")
