"""The mesh envelope: what one node sends another over ZeroMQ. Pure: bytes in, values out.

Event frames (PUB -> SUB) are ONE ZeroMQ frame each, because a multipart send is a Python
loop per frame in pyzmq and costs 3x a single frame::

    topic (UTF-8) | 0x00 | msgpack([WIRE_VERSION, [item, item, ...]])

* The topic comes first so that ZeroMQ's prefix filtering at the publishing node works on
  the literal prefix of a subscriber's filter. MQTT forbids U+0000 in topic names, so the
  NUL byte cannot occur inside a topic and ends it unambiguously; an exact (wildcard-free)
  filter subscribes to ``topic + NUL`` and so never receives ``topic/longer``.
* Many messages for the same topic travel in one frame: coalescing per topic under load is
  what lets the mesh beat a per-message send loop, and it keeps prefix filtering exact.
* An item is the bare payload (``bytes``) for the common case of QoS 0, not retained, no
  properties; otherwise ``[payload, flags, timestamp, properties-or-None]`` with
  ``flags = qos | retain << 2``. The bare form saves a list per message on both sides.

Retained messages travel on their own channel, frames that start with NUL (no topic can)::

    0x00 | topic | 0x00 | msgpack([WIRE_VERSION, [entry, ...], seq])

Every node subscribes to that channel whatever its local filters, because every node keeps
the whole retained state. ``seq`` counts a node's retained frames, so a receiver that sees a
gap (a frame lost at the high-water mark, or sent before its subscription took effect)
knows to resynchronise.

The sending node's identity is never read from the envelope: the receiver knows it from the
CURVE key of the socket the frame came from.

Control messages (DEALER -> ROUTER) are msgpack maps with a type under ``"t"``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from zmesh.mesh import inbound
from zmesh.retained.lastvalue import BUCKETS, RetainedEntry

WIRE_VERSION = 1
TOPIC_END = b"\x00"
FLAG_RETAIN = 4
QOS_MASK = 3


class WireError(ValueError):
    """A frame from a peer that is not a valid envelope of a version we speak; ``reason``
    is the drop reason it is counted under (``zmesh.drops``), "" for the caller's default."""

    def __init__(self, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


# Bounds on the lists a hello carries: far above any real mesh, far below what would cost.
MAX_HELLO_PEERS = 4096
MAX_HELLO_QUEUES = 4096


class Item(NamedTuple):
    """One message inside an event frame, decoded."""

    payload: bytes
    qos: int
    retain: bool
    timestamp: int
    properties: dict[str, Any] | None


def encode_item(
    payload: bytes, qos: int, retain: bool, timestamp: int, properties: dict[str, Any] | None
) -> bytes | list[Any]:
    """The wire form of one message: the bare payload when nothing else needs saying.

    ``timestamp``: for a live publish, the publisher's wall clock in microseconds (0: not
    stamped), which receivers use only to time delivery (zmesh.ops.latency)."""
    if qos == 0 and not retain and not properties:
        return payload
    return [payload, qos | (FLAG_RETAIN if retain else 0), timestamp, properties or None]


_packb = msgpack.Packer(use_bin_type=True).pack


def encode_event_frame(topic: bytes, items: list[bytes | list[Any]]) -> bytes:
    """One frame carrying ``items`` (from :func:`encode_item`) for one topic."""
    return topic + TOPIC_END + _packb([WIRE_VERSION, items])


RETAINED_CHANNEL = b"\x00"


class RetainedItem(NamedTuple):
    payload: bytes
    qos: int
    timestamp: int
    properties: dict[str, Any] | None
    expires_at: int | None


def encode_retained_item(
    payload: bytes, qos: int, timestamp: int, properties: dict[str, Any] | None, expires_at: int | None
) -> list[Any]:
    return [payload, qos, timestamp, properties or None, expires_at]


def encode_retained_frame(topic: bytes, items: list[list[Any]], seq: int) -> bytes:
    return RETAINED_CHANNEL + topic + TOPIC_END + _packb([WIRE_VERSION, items, seq])


def decode_retained_frame(frame: bytes) -> tuple[str, list[RetainedItem], int]:
    """A retained-channel frame: topic, items, the sender's retained sequence number."""
    end = frame.find(TOPIC_END, 1)
    if not frame.startswith(RETAINED_CHANNEL) or end <= 1:
        raise WireError("retained frame has no topic")
    try:
        topic = frame[1:end].decode()
        body = msgpack.unpackb(frame[end + 1 :], raw=False, use_list=True)
    except (UnicodeDecodeError, ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable retained frame: {exc}") from None
    if not isinstance(body, list) or len(body) != 3 or body[0] != WIRE_VERSION:
        raise WireError("retained body is not [version, items, seq] of our version")
    _version, raw_items, seq = body
    if not isinstance(raw_items, list) or type(seq) is not int:
        raise WireError("retained items or sequence malformed")
    items = []
    for raw in raw_items:
        if not (
            isinstance(raw, list)
            and len(raw) == 5
            and type(raw[0]) is bytes
            and raw[1] in (0, 1, 2)
            and type(raw[2]) is int
            and (raw[3] is None or isinstance(raw[3], dict))
            and (raw[4] is None or type(raw[4]) is int)
        ):
            raise WireError("malformed retained item")
        items.append(RetainedItem(*raw))
    return topic, items, seq


def subscription_prefix(literal_prefix: str, exact: bool) -> bytes:
    """The ZeroMQ SUB prefix for a filter: its literal prefix, closed by NUL when exact."""
    prefix = literal_prefix.encode()
    return prefix + TOPIC_END if exact else prefix


def decode_event_frame(frame: bytes) -> tuple[str, list[bytes | Item], bool]:
    """Split a frame into its topic, its items and whether all of them are bare payloads.

    Bare payloads (QoS 0, not retained, no properties) stay ``bytes``; the others become
    ``Item``. The flag lets the receiver hand a whole batch of plain messages on at once.
    Raises WireError on anything malformed, before anything is delivered."""
    end = frame.find(TOPIC_END)
    if end <= 0:
        raise WireError("event frame has no topic terminator" if end < 0 else "empty topic")
    try:
        topic = frame[:end].decode()
        body = msgpack.unpackb(frame[end + 1 :], raw=False, use_list=True)
    except (UnicodeDecodeError, ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable event frame: {exc}") from None
    if not isinstance(body, list) or len(body) != 2:
        raise WireError("event body is not [version, items]")
    version, raw_items = body
    if version != WIRE_VERSION:
        raise WireError(f"event frame version {version!r}; this node speaks {WIRE_VERSION}")
    if not isinstance(raw_items, list):
        raise WireError("event items are not a list")
    plain = True
    for index, raw in enumerate(raw_items):
        if type(raw) is not bytes:
            raw_items[index] = _decode_item(raw)
            plain = False
    return topic, raw_items, plain


def _decode_item(raw: Any) -> Item:
    if (
        isinstance(raw, list)
        and len(raw) == 4
        and type(raw[0]) is bytes
        and type(raw[1]) is int
        and 0 <= raw[1] <= 7
        and (raw[1] & QOS_MASK) != 3
        and type(raw[2]) is int
        and (raw[3] is None or isinstance(raw[3], dict))
    ):
        payload, flags, timestamp, properties = raw
        return Item(payload, flags & QOS_MASK, bool(flags & FLAG_RETAIN), timestamp, properties)
    raise WireError("malformed event item")


# ---------------------------------------------------------------------------------------
# Control messages


@dataclass(frozen=True)
class Hello:
    """What a node says about itself; sent as hello (request) and as welcome (reply).

    Ports only, no host: the receiver reaches us at the host it already knows (the seed it
    dialled, or the address our connection came from), so a node bound to 0.0.0.0 or
    behind NAT-free pod networking needs no configuration to be reachable. An explicit
    ``host`` overrides that when set (``mesh.advertise_host``).
    """

    name: str
    version: int
    incarnation: int
    control_port: int
    pub_port: int
    pull_port: int
    host: str | None = None
    # (public key z85, host, control port) of peers this node knows: peer exchange.
    peers: tuple[tuple[str, str, int], ...] = field(default_factory=tuple)
    # (queue name, prefetch) of the work queues this node has workers for
    queues: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    # Sequence number of the last retained frame this node has sent: a peer that has not
    # seen it by the next hello missed it (PUB drops frames for a SUB still connecting).
    retained_seq: int = 0
    # The node's certificate chain (zmesh.security.identity) when the mesh runs with a mesh
    # authority: what proves that this CURVE key is a member. None with trusted directories.
    cert: bytes | None = None


MAX_CERT_BYTES = 4096  # a chain is a few hundred bytes; identity.MAX_CHAIN_BYTES bounds it too
HELLO = "hello"
WELCOME = "welcome"
REFUSED = "refused"
BYE = "bye"  # a clean shutdown: mark me down now, not after the expiry
PROBE = "probe"  # "who are you?" from zmesh doctor: answered with a welcome, never a member
SYNC = "sync"  # "here are my retained bucket digests": answered with SYNC_DATA
SYNC_DATA = "syncdata"  # entries of the buckets that differ, in chunks; the last says so
SYNC_CHUNK = 2000  # entries per SYNC_DATA message, at most
SYNC_CHUNK_BYTES = 256 * 1024  # and a chunk is closed past this many bytes (about)


def encode_sync_request(digests: list[int]) -> bytes:
    return _packb({"t": SYNC, "v": WIRE_VERSION, "d": digests})


def _entry_size(entry: RetainedEntry) -> int:
    size = len(entry.payload) + len(entry.topic) + len(entry.origin) + 32
    properties = entry.properties
    if properties:  # rare, and bounded (mesh.inbound); counted so a chunk stays bounded
        for value in properties.values():
            size += 8 + (len(value) if isinstance(value, str | bytes) else 0)
            if isinstance(value, list):
                size += sum(len(a) + len(b) + 8 for a, b in value)
    return size


def sync_chunks(entries: list[RetainedEntry]) -> list[list[RetainedEntry]]:
    """``entries`` cut into SYNC_DATA chunks of at most SYNC_CHUNK entries and about
    SYNC_CHUNK_BYTES (one entry more at most): every message stays far below
    ``mesh.max_message_size``. Always at least one chunk (an empty answer says "last")."""
    chunks: list[list[RetainedEntry]] = []
    start, size = 0, 0
    for index, entry in enumerate(entries):
        size += _entry_size(entry)
        if index + 1 - start >= SYNC_CHUNK or size >= SYNC_CHUNK_BYTES:
            chunks.append(entries[start : index + 1])
            start, size = index + 1, 0
    if start < len(entries) or not chunks:
        chunks.append(entries[start:])
    return chunks


def encode_sync_data(entries: list[RetainedEntry], last: bool, seq: int) -> bytes:
    rows = [
        [e.topic, e.payload, e.qos, e.origin, e.timestamp, e.properties, e.expires_at] for e in entries
    ]
    return _packb({"t": SYNC_DATA, "v": WIRE_VERSION, "e": rows, "l": last, "s": seq})


def encode_control(kind: str, hello: Hello | None = None, reason: str = "") -> bytes:
    body: dict[str, Any] = {"t": kind, "v": WIRE_VERSION}
    if hello is not None:
        body.update(
            n=hello.name,
            i=hello.incarnation,
            pc=hello.control_port,
            pp=hello.pub_port,
            pl=hello.pull_port,
            h=hello.host,
            ps=[list(p) for p in hello.peers],
            q=[list(q) for q in hello.queues],
            rs=hello.retained_seq,
        )
        if hello.cert is not None:
            body["ct"] = hello.cert
    if reason:
        body["r"] = reason
    return _packb(body)


@dataclass(frozen=True)
class ControlMessage:
    kind: str
    version: int
    hello: Hello | None
    reason: str
    digests: list[int] | None = None  # SYNC
    entries: list[RetainedEntry] | None = None  # SYNC_DATA
    last: bool = False  # SYNC_DATA
    seq: int = 0  # SYNC_DATA: the sender's retained sequence when it answered


def decode_control(data: bytes) -> ControlMessage:
    """Decode a control message. A peer speaking another protocol version decodes fine (so
    it can be told why it is refused); the caller compares ``version``."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable control message: {exc}") from None
    if not isinstance(body, dict):
        raise WireError("control message is not a map")
    kind, version = body.get("t"), body.get("v")
    if not isinstance(kind, str) or type(version) is not int:
        raise WireError("control message lacks type or version")
    reason = body.get("r", "")
    if not isinstance(reason, str):
        raise WireError("control reason is not a string")
    hello = None
    if kind in (HELLO, WELCOME) and version == WIRE_VERSION:
        hello = _decode_hello(body)
    if kind == SYNC and version == WIRE_VERSION:
        digests = body.get("d")
        if not (
            isinstance(digests, list)
            and len(digests) == BUCKETS
            and all(type(d) is int and 0 <= d < 2**64 for d in digests)
        ):
            raise WireError("sync request digests malformed")
        return ControlMessage(kind, version, None, reason, digests=digests)
    if kind == SYNC_DATA and version == WIRE_VERSION:
        rows, last, seq = body.get("e"), body.get("l"), body.get("s")
        if not isinstance(rows, list) or type(last) is not bool or type(seq) is not int:
            raise WireError("sync data malformed")
        return ControlMessage(kind, version, None, reason, entries=[_decode_row(r) for r in rows], last=last, seq=seq)
    return ControlMessage(kind, version, hello, reason)


def _decode_row(row: Any) -> RetainedEntry:
    # type() is, not isinstance: this runs 100,000 times for a late joiner.
    if not (
        type(row) is list
        and len(row) == 7
        and type(row[0]) is str
        and row[0]
        and "\x00" not in row[0]
        and type(row[1]) is bytes
        and type(row[2]) is int and 0 <= row[2] <= 2
        and type(row[3]) is str
        and type(row[4]) is int
        and (row[5] is None or type(row[5]) is dict)
        and (row[6] is None or type(row[6]) is int)
    ):
        raise WireError("malformed retained entry in sync data")
    return RetainedEntry(*row)


def _decode_hello(body: dict[str, Any]) -> Hello:
    name, incarnation = body.get("n"), body.get("i")
    ports: list[Any] = [body.get("pc"), body.get("pp"), body.get("pl")]
    host, peers, queues = body.get("h"), body.get("ps", []), body.get("q", [])
    retained_seq = body.get("rs", 0)  # absent from older nodes' hellos
    bad = inbound.BAD_HELLO
    cert = body.get("ct")  # absent without a mesh authority
    if cert is not None and (not isinstance(cert, bytes) or len(cert) > MAX_CERT_BYTES):
        raise WireError("hello certificate is not bytes of a bounded size", bad)
    if type(retained_seq) is not int or not 0 <= retained_seq < 2**63:
        raise WireError("hello retained sequence is not a non-negative integer", bad)
    if not isinstance(queues, list) or len(queues) > MAX_HELLO_QUEUES or not all(
        isinstance(q, list) and len(q) == 2 and inbound.valid_queue(q[0])
        and type(q[1]) is int and 0 < q[1] < 1_000_000
        for q in queues
    ):
        raise WireError("hello queue list is malformed", bad)
    if not inbound.valid_name(name) or type(incarnation) is not int or not -(2**63) <= incarnation < 2**64:
        raise WireError("hello lacks a valid name or incarnation", bad)
    if not all(type(p) is int and 0 < p < 65536 for p in ports):
        raise WireError("hello has invalid ports", bad)
    # The host and the peers' hosts are dialled: ZeroMQ gets only an IP address or a host name.
    if host is not None and not inbound.valid_host(host):
        raise WireError(f"hello host {str(host)[:80]!r} is not an address", bad)
    if not isinstance(peers, list) or len(peers) > MAX_HELLO_PEERS or not all(
        isinstance(p, list)
        and len(p) == 3
        and inbound.valid_key(p[0])
        and inbound.valid_host(p[1])
        and type(p[2]) is int
        and 0 < p[2] < 65536
        for p in peers
    ):
        raise WireError("hello peer list is malformed", bad)
    return Hello(
        name=name,  # type: ignore[arg-type]
        version=WIRE_VERSION,
        incarnation=incarnation,
        control_port=ports[0],
        pub_port=ports[1],
        pull_port=ports[2],
        host=host,
        peers=tuple((p[0], p[1], p[2]) for p in peers),
        queues=tuple((q[0], q[1]) for q in queues),
        retained_seq=retained_seq,
        cert=cert,
    )


# ---------------------------------------------------------------------------------------
# Jobs: PUSH -> PULL carries jobs to a worker node, and the worker's reports back to the
# submitter's PULL the same way; the first byte says which (the sender is known from ZAP).
#
# Both directions are batched, because a ZeroMQ send or receive costs far more in Python
# than encoding one more entry: a job frame carries every job dispatched to one worker node
# in one pump, ``J msgpack([WIRE_VERSION, lease, [[id, queue, payload, attempt], ...]])``,
# and a report frame every report for one submitter since the last flush,
# ``R msgpack([WIRE_VERSION, [[id, OK, result] | [id, FAILED, reason, retry] |
# [id, EXTEND, seconds] | [id, REFUSED], ...]])``.

JOBS_FRAME, REPORTS_FRAME = b"J", b"R"
MAX_JOB_LEASE = 86_400.0  # seconds: a lease or extension longer than a day is malformed


class JobFrame(NamedTuple):
    id: str
    queue: str
    payload: bytes
    attempt: int
    lease: float


def encode_jobs(lease: float, jobs: list[list[Any]]) -> bytes:
    """One frame of jobs, each ``[id, queue, payload, attempt]``, all with this ``lease``."""
    return JOBS_FRAME + _packb([WIRE_VERSION, lease, jobs])


def decode_jobs(frame: bytes) -> list[JobFrame]:
    """A job frame; WireError (and nothing else) if any part of it is malformed."""
    body = _unpack_job_frame(frame, JOBS_FRAME)
    if not (
        type(body) is list and len(body) == 3 and body[0] == WIRE_VERSION
        and type(body[1]) in (int, float) and 0 < body[1] <= MAX_JOB_LEASE
        and type(body[2]) is list
    ):
        raise WireError("job frame is not [version, lease, jobs] of our version")
    lease = float(body[1])
    jobs = []
    for raw in body[2]:
        # The id and queue end up in topics ($jobs/queue/QUEUE/ID): checked as topics are.
        if not (
            type(raw) is list and len(raw) == 4
            and inbound.valid_job_id(raw[0])
            and inbound.valid_queue(raw[1])
            and type(raw[2]) is bytes
            and type(raw[3]) is int and 0 < raw[3] < 2**31
        ):
            raise WireError("malformed job in job frame")
        jobs.append(JobFrame(raw[0], raw[1], raw[2], raw[3], lease))
    return jobs


# What a report says about a job. REFUSED: not taken at all (this node no longer serves
# its queue), so the delivery does not count as an attempt.
JOB_OK, JOB_FAILED, JOB_EXTEND, JOB_REFUSED = 0, 1, 2, 3


class JobReport(NamedTuple):
    id: str
    kind: int = JOB_OK
    result: bytes = b""  # JOB_OK
    error: str = ""  # JOB_FAILED
    retry: bool = True  # JOB_FAILED: may it be tried again (False: dead letter now)
    seconds: float = 0.0  # JOB_EXTEND: from now; 0 means one more lease


def _unpack_job_frame(frame: bytes, kind: bytes) -> Any:
    if frame[:1] != kind:
        raise WireError("not a job frame" if kind == JOBS_FRAME else "not a job report frame")
    try:
        return msgpack.unpackb(memoryview(frame)[1:], raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable job frame: {exc}") from None


def encode_job_reports(reports: list[JobReport]) -> bytes:
    rows: list[list[Any]] = []
    for r in reports:
        if r.kind == JOB_OK:
            rows.append([r.id, JOB_OK, r.result])
        elif r.kind == JOB_FAILED:
            rows.append([r.id, JOB_FAILED, r.error, r.retry])
        elif r.kind == JOB_EXTEND:
            rows.append([r.id, JOB_EXTEND, r.seconds])
        else:
            rows.append([r.id, JOB_REFUSED])
    return REPORTS_FRAME + _packb([WIRE_VERSION, rows])


def decode_job_reports(frame: bytes) -> list[JobReport]:
    """A report frame; WireError (and nothing else) if any part of it is malformed."""
    body = _unpack_job_frame(frame, REPORTS_FRAME)
    if type(body) is not list or len(body) != 2 or body[0] != WIRE_VERSION or type(body[1]) is not list:
        raise WireError("job report frame is not [version, reports] of our version")
    rows = body[1]
    reports = []
    for row in rows:
        if type(row) is not list or len(row) < 2 or not inbound.valid_job_id(row[0]) or type(row[1]) is not int:
            raise WireError("malformed job report")
        kind = row[1]
        if kind == JOB_OK and len(row) == 3 and type(row[2]) is bytes:
            reports.append(JobReport(row[0], JOB_OK, row[2]))
        elif kind == JOB_FAILED and len(row) == 4 and type(row[2]) is str and type(row[3]) is bool:
            reports.append(JobReport(row[0], JOB_FAILED, b"", row[2], row[3]))
        elif (
            kind == JOB_EXTEND and len(row) == 3 and type(row[2]) in (int, float)
            and 0 <= row[2] <= MAX_JOB_LEASE
        ):
            reports.append(JobReport(row[0], JOB_EXTEND, seconds=float(row[2])))
        elif kind == JOB_REFUSED and len(row) == 2:
            reports.append(JobReport(row[0], JOB_REFUSED))
        else:
            raise WireError("malformed job report")
    return reports


def encode_shared_message(topic: str, payload: bytes, qos: int, properties: dict[str, Any] | None) -> bytes:
    """A message for a shared subscription group, carried as the payload of a job."""
    return _packb([topic, payload, qos, properties or None])


def decode_shared_message(data: bytes) -> tuple[str, bytes, int, dict[str, Any] | None]:
    try:
        body = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable shared message: {exc}") from None
    if not (
        type(body) is list and len(body) == 4
        and type(body[0]) is str and body[0] and "\x00" not in body[0]
        and type(body[1]) is bytes
        and body[2] in (0, 1, 2) and type(body[2]) is int
        and (body[3] is None or type(body[3]) is dict)
    ):
        raise WireError("malformed shared message")
    try:  # delivered to MQTT clients as it is: the rules of a client's PUBLISH
        inbound.check_topic(body[0])
        properties = inbound.check_properties(body[3])
    except inbound.Refused as exc:
        raise WireError(f"shared message: {exc}", exc.reason) from None
    return body[0], body[1], body[2], properties
