from zmesh.mqtt.session import InboundQoS2, OutboundWindow, Outgoing


def msg(n: int) -> Outgoing:
    return Outgoing(f"t/{n}", b"p", 1, False, None)


def test_window_holds_inflight_then_queues_then_drops() -> None:
    window = OutboundWindow(max_inflight=2, max_queued=2)
    sent = [window.offer(msg(i)) for i in range(5)]
    assert [m.packet_id for m in sent if m] == [1, 2]
    assert sent[2] is None and sent[3] is None and sent[4] is None
    assert window.dropped == 1 and len(window.queue) == 2
    # the oldest queued message (t/2) made room for t/4: a returning client wants the latest
    assert [m.topic for m in window.queue] == ["t/3", "t/4"]
    released = window.acknowledge(1)
    assert [m.topic for m in released] == ["t/3"] and released[0].packet_id == 3
    assert window.acknowledge(1) == []  # a duplicate ack is harmless


def test_packet_ids_skip_ids_still_in_flight() -> None:
    window = OutboundWindow(max_inflight=3, max_queued=0)
    window._next_id = 65534
    ids = [window.offer(msg(i)).packet_id for i in range(3)]
    assert ids == [65535, 1, 2]


def test_qos2_duplicates_are_not_delivered_twice() -> None:
    inbound = InboundQoS2(limit=10)
    assert inbound.received(7) is True
    assert inbound.received(7) is False
    assert inbound.released(7) is True
    assert inbound.released(7) is False
    assert inbound.received(7) is True
