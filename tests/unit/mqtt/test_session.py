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


def test_wrong_acknowledgement_types_are_named() -> None:
    """MQTT-4.8.0-1: an ack of the wrong type for a message in flight is a protocol error;
    one for an id not in flight is not (a client may acknowledge twice)."""
    w = OutboundWindow(max_inflight=5, max_queued=5)
    q1 = w.offer(Outgoing("t", b"1", 1, False, None))
    q2 = w.offer(Outgoing("t", b"2", 2, False, None))
    assert q1 is not None and q2 is not None
    assert w.wrong_ack("PUBACK", q1.packet_id) is None
    assert w.wrong_ack("PUBREC", q1.packet_id) and w.wrong_ack("PUBCOMP", q1.packet_id)
    assert w.wrong_ack("PUBREC", q2.packet_id) is None
    assert w.wrong_ack("PUBACK", q2.packet_id) and w.wrong_ack("PUBCOMP", q2.packet_id)
    assert w.pubrec(q2.packet_id)
    assert w.wrong_ack("PUBCOMP", q2.packet_id) is None and w.wrong_ack("PUBREC", q2.packet_id) is None
    assert w.wrong_ack("PUBACK", q2.packet_id)  # PUBACK instead of PUBCOMP
    for kind in ("PUBACK", "PUBREC", "PUBCOMP"):
        assert w.wrong_ack(kind, 999) is None


def test_max_queued_bytes_drops_the_new_message_as_mosquitto() -> None:
    from zmesh.mqtt.session import DROP_QUEUED_BYTES

    w = OutboundWindow(max_inflight=1, max_queued=100, max_queued_bytes=250)
    big = [Outgoing(f"t/{i}", b"x" * 100, 1, False, None) for i in range(6)]
    assert w.offer(big[0]) is big[0]  # in flight: not queued
    for m in big[1:]:
        assert w.offer(m) is None
    # Queued while under the limit: 100, 200, 300 bytes (the last one passes it), then dropped.
    assert [m.topic for m in w.queue] == ["t/1", "t/2", "t/3"] and w.queued_bytes == 300
    assert w.drops == {DROP_QUEUED_BYTES: 2} and w.dropped == 2
    released = w.acknowledge(big[0].packet_id)
    assert [m.topic for m in released] == ["t/1"] and w.queued_bytes == 200


def test_the_node_budget_counts_queued_and_inflight_and_is_released() -> None:
    from zmesh.mqtt.session import DROP_QUEUE_BUDGET, MESSAGE_OVERHEAD, QueueBudget

    budget = QueueBudget(limit=3 * (100 + 3 + MESSAGE_OVERHEAD))
    a = OutboundWindow(max_inflight=1, max_queued=100, budget=budget)
    b = OutboundWindow(max_inflight=1, max_queued=100, budget=budget)
    q1 = a.offer(Outgoing("t/1", b"x" * 100, 1, False, None))
    assert q1 is not None and budget.used == 100 + 3 + MESSAGE_OVERHEAD
    a.offer(Outgoing("t/2", b"x" * 100, 1, False, None))
    q3 = b.offer(Outgoing("t/3", b"x" * 100, 2, False, None))
    assert q3 is not None and budget.full()
    assert b.offer(Outgoing("t/4", b"x" * 100, 1, False, None)) is None
    assert b.drops == {DROP_QUEUE_BUDGET: 1}
    assert b.pubrec(q3.packet_id) and budget.used == 3 * (103 + MESSAGE_OVERHEAD) - 100  # payload freed
    b.complete(q3.packet_id)
    a.acknowledge(q1.packet_id)  # t/2 moves into flight: still held
    assert budget.used == 103 + MESSAGE_OVERHEAD
    a.close()
    assert budget.used == 0
