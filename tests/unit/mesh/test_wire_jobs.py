"""Job frames, report frames and shared-subscription messages: round trips, and anything a
peer might send decodes to a value or to WireError, never to another exception."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.mesh import wire

# Ids and queues end up in topics ($jobs/queue/QUEUE/ID): no NUL and no wildcards, and a
# queue is one topic level (zmesh.mesh.inbound).
ids = st.text(min_size=1, max_size=20).filter(lambda t: not set(t) & set("\x00+#"))
queues = ids.filter(lambda t: "/" not in t)
jobs = st.lists(st.tuples(ids, queues, st.binary(max_size=50), st.integers(1, 10)), max_size=20)
reports = st.lists(
    st.one_of(
        st.builds(lambda i, r: wire.JobReport(i, wire.JOB_OK, r), ids, st.binary(max_size=30)),
        st.builds(lambda i, e, r: wire.JobReport(i, wire.JOB_FAILED, b"", e, r), ids, st.text(max_size=30), st.booleans()),
        st.builds(lambda i, s: wire.JobReport(i, wire.JOB_EXTEND, seconds=s), ids,
                  st.floats(0, wire.MAX_JOB_LEASE, allow_nan=False)),
        st.builds(lambda i: wire.JobReport(i, wire.JOB_REFUSED), ids),
    ),
    max_size=20,
)


@given(st.floats(0.001, wire.MAX_JOB_LEASE, allow_nan=False), jobs)
def test_job_frames_round_trip(lease: float, batch: list[tuple[str, str, bytes, int]]) -> None:
    frame = wire.encode_jobs(lease, [list(j) for j in batch])
    assert wire.decode_jobs(frame) == [wire.JobFrame(*j, lease) for j in batch]


@given(reports)
def test_report_frames_round_trip(batch: list[wire.JobReport]) -> None:
    assert wire.decode_job_reports(wire.encode_job_reports(batch)) == batch


@given(st.text(min_size=1, max_size=30).filter(lambda t: not set(t) & set("\x00+#") and t[:1] != "$"),
       st.binary(max_size=40), st.integers(0, 2),
       st.one_of(st.none(), st.fixed_dictionaries({}, optional={
           "message_expiry_interval": st.integers(0, 2**32 - 1), "content_type": st.text(max_size=5).filter(lambda t: "\x00" not in t),
           "user_property": st.lists(st.tuples(st.just("k"), st.just("v")), max_size=2)})))
def test_shared_messages_round_trip(topic: str, payload: bytes, qos: int, properties: dict | None) -> None:
    message = wire.decode_shared_message(wire.encode_shared_message(topic, payload, qos, properties))
    assert message == (topic, payload, qos, properties or None)


@pytest.mark.parametrize("topic, properties", [("$SYS/x", None), ("a/+", None), ("a", {"bogus": 1})])
def test_a_shared_message_a_client_could_not_publish_is_refused(topic: str, properties: dict | None) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_shared_message(wire.encode_shared_message(topic, b"x", 0, properties))


@pytest.mark.parametrize("job", [["id", "q" * 5000, b"x", 1], ["id", "a/+/b", b"x", 1], ["i" * 2000, "q", b"x", 1],
                                 ["a+b", "q", b"x", 1]])
def test_a_job_whose_id_or_queue_cannot_be_a_topic_is_refused(job: list) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_jobs(wire.encode_jobs(1.0, [job]))


def test_the_kind_byte_keeps_jobs_and_reports_apart() -> None:
    with pytest.raises(wire.WireError):
        wire.decode_jobs(wire.encode_job_reports([wire.JobReport("a")]))
    with pytest.raises(wire.WireError):
        wire.decode_job_reports(wire.encode_jobs(1.0, [["a", "q", b"", 1]]))


@pytest.mark.parametrize("body", [
    [wire.WIRE_VERSION, 0, []],  # no lease
    [wire.WIRE_VERSION, float("nan"), []],
    [wire.WIRE_VERSION + 1, 1.0, []],
    [wire.WIRE_VERSION, 1.0, [["", "q", b"", 1]]],  # empty id
    [wire.WIRE_VERSION, 1.0, [["a", "q", b"", 0]]],  # attempt 0
    [wire.WIRE_VERSION, 1.0, [["a", "q", "text", 1]]],  # payload not bytes
    [wire.WIRE_VERSION, 1.0, [["a", "q", b"", True]]],
])
def test_malformed_job_frames_are_refused(body: list) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_jobs(wire.JOBS_FRAME + msgpack.packb(body))


@pytest.mark.parametrize("row", [
    ["a", True, b""],  # a bool is no kind
    ["a", wire.JOB_EXTEND, -1],
    ["a", wire.JOB_EXTEND, wire.MAX_JOB_LEASE + 1],
    ["a", wire.JOB_FAILED, "why"],  # no retry flag
    ["a", wire.JOB_REFUSED, 1],
    ["a", 9, b""],
])
def test_malformed_reports_are_refused(row: list) -> None:
    with pytest.raises(wire.WireError):
        wire.decode_job_reports(wire.REPORTS_FRAME + msgpack.packb([wire.WIRE_VERSION, [row]]))


@settings(max_examples=500)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_wire_error(data: bytes) -> None:
    for decode in (wire.decode_jobs, wire.decode_job_reports, wire.decode_shared_message):
        for frame in (data, wire.JOBS_FRAME + data, wire.REPORTS_FRAME + data):
            try:
                decode(frame)
            except wire.WireError:
                pass


anything = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=5)
    | st.binary(max_size=5),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
    max_leaves=20,
)


@settings(max_examples=500)
@given(anything)
def test_any_msgpack_value_decodes_or_raises_wire_error(value: object) -> None:
    packed = msgpack.packb(value)
    for decode, kind in ((wire.decode_jobs, wire.JOBS_FRAME), (wire.decode_job_reports, wire.REPORTS_FRAME),
                         (wire.decode_shared_message, b"")):
        try:
            decode(kind + packed)
        except wire.WireError:
            pass
