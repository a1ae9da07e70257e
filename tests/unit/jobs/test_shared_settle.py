"""The outbound window tells a shared subscription's message how it ended: done with here
(acknowledged, or expired) or dropped undelivered (to go to another member), exactly once."""

from __future__ import annotations

from zmesh.mqtt.session import OutboundWindow, Outgoing


def message(topic: str, outcomes: list[tuple[str, bool]], qos: int = 1, expires_at: float = 0.0) -> Outgoing:
    return Outgoing(topic, b"x", qos, False, None, expires_at=expires_at,
                    settle=lambda kept: outcomes.append((topic, kept)))


def test_an_acknowledged_or_completed_message_is_settled_as_kept_once() -> None:
    outcomes: list[tuple[str, bool]] = []
    window = OutboundWindow(max_inflight=2, max_queued=10)
    one = window.offer(message("q1", outcomes))
    two = window.offer(message("q2", outcomes, qos=2))
    assert one is not None and two is not None
    window.acknowledge(one.packet_id)
    window.acknowledge(one.packet_id)  # a duplicate PUBACK settles nothing more
    assert window.pubrec(two.packet_id) and outcomes == [("q1", True)]  # PUBREC is not the end
    window.complete(two.packet_id)
    assert outcomes == [("q1", True), ("q2", True)]


def test_a_message_dropped_from_a_full_queue_is_settled_as_not_kept() -> None:
    outcomes: list[tuple[str, bool]] = []
    window = OutboundWindow(max_inflight=1, max_queued=1)
    window.offer(message("sent", outcomes))
    window.offer(message("queued", outcomes))
    window.offer(message("newest", outcomes))  # the oldest queued one goes
    assert outcomes == [("queued", False)]
    nothing = OutboundWindow(max_inflight=1, max_queued=0)
    nothing.offer(message("a", outcomes), online=False)  # may not wait at all
    assert outcomes[-1] == ("a", False)


def test_an_expired_message_is_settled_as_kept_and_a_refused_one_as_not() -> None:
    outcomes: list[tuple[str, bool]] = []
    window = OutboundWindow(max_inflight=1, max_queued=10)
    window.offer(message("old", outcomes, expires_at=5.0), online=False)
    window.offer(message("unreadable", outcomes), online=False)
    window.offer(message("fine", outcomes), online=False)
    assert window.retain_only(lambda m: m.topic != "unreadable") == 1
    assert window.resume(now=10.0)[0].topic == "fine"
    assert outcomes == [("unreadable", False), ("old", True)]  # expired: nobody is to get it
