"""zmesh.mesh.delivery alone: two Delivery services wired back to back through in-memory
channels (no sockets), on a real event loop."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from zmesh.mesh import streamwire as sw
from zmesh.mesh.delivery import BAD_CONTROL, Delivery, DeliverySettings
from zmesh.mesh.flow import DeliveryRefused, FlowConfig
from zmesh.mesh.outbox import ENTRY_OVERHEAD, OutboxConfig
from zmesh.mesh.streams import StreamConfig

A, B = "A" * 40, "B" * 40


class Pair:
    def __init__(self, settings: DeliverySettings | None = None, deliver_to_b: bool = True) -> None:
        settings = settings or DeliverySettings()
        self.released: list[tuple[str, str, bytes]] = []
        self.drops: list[tuple[str, str]] = []
        self.gaps: list[Any] = []
        self.deliver_to_b = deliver_to_b
        drop = lambda reason, detail: self.drops.append((reason, detail))  # noqa: E731
        self.a = Delivery(A, settings, self._data_to_b, lambda k, d: deliver_to_b and self._control(self.b, A, d),
                          lambda k, e: None, self.gaps.extend, drop)
        self.b = Delivery(B, settings, lambda f, n: True, lambda k, d: self._control(self.a, B, d),
                          lambda k, e: self.released.extend((k, m.topic, m.payload) for m in e), self.gaps.extend, drop)

    def _data_to_b(self, frame: bytes, count: int) -> bool:
        if self.deliver_to_b:
            asyncio.get_running_loop().call_soon(self.b.on_frame, A, frame)
        return True

    @staticmethod
    def _control(to: Delivery, sender: str, data: bytes) -> bool:
        asyncio.get_running_loop().call_soon(to.on_control, sender, data)
        return True

    def start(self) -> None:
        for d, other in ((self.a, B), (self.b, A)):
            d.start()
            d.peer_up(other)


async def _settle(condition: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)


def test_qos1_streams_in_order_after_interest_with_backfill() -> None:
    async def run() -> None:
        pair = Pair()
        pair.start()
        # Published before b's interest arrived: backfilled when it does.
        for i in range(3):
            assert pair.a.publish(b"t/x", "t/x", f"{i}".encode(), 1, None) is None
        pair.b.set_interest({b"t/"}, set())
        await _settle(lambda: len(pair.released) == 3)
        for i in range(3, 10):
            pair.a.publish(b"t/x", "t/x", f"{i}".encode(), 1, None)
        await _settle(lambda: len(pair.released) == 10 and not pair.a.outbox.unacknowledged())
        assert [p for _k, _t, p in pair.released] == [f"{i}".encode() for i in range(10)]
        assert not pair.gaps and not pair.drops
    asyncio.run(run())


def test_a_publish_past_the_gate_is_refused_with_quota_exceeded() -> None:
    async def run() -> None:
        size = len("t/x") + 10
        settings = DeliverySettings(outbox=OutboxConfig(max_bytes=2 * (size + ENTRY_OVERHEAD)),
                                    flow=FlowConfig(max_held=1), stop_timeout=0.2)
        pair = Pair(settings, deliver_to_b=False)  # nothing reaches b: it acknowledges nothing
        pair.start()
        pair.b.set_interest({b"t/"}, set())  # b -> a still works: a hears the interest
        await _settle(lambda: B in pair.a.interest)
        results = [pair.a.publish(b"t/x", "t/x", bytes(10), 1, None) for _ in range(4)]
        assert results[0] is None and results[1] is None  # room for two
        assert results[2] is not None and not results[2].done()  # held: its PUBACK waits
        refused = results[3]
        assert refused is not None and refused.done()
        error = refused.exception()
        assert isinstance(error, DeliveryRefused) and error.reason_code == 0x97
        assert pair.a.counters["refused_total"] == 1
        await pair.a.stop()  # what still waits is failed, never acknowledged
        assert isinstance(results[2].exception(), DeliveryRefused)
    asyncio.run(run())


@pytest.mark.parametrize("junk", [b"\xfe", b"\xfe\x93\x01\x02", b"\xfe\x94\x01\x01\x00\x00",
                                  sw.encode_nack(1, 1, 1 + 70_000)])
def test_bad_control_costs_one_counted_drop(junk: bytes) -> None:
    async def run() -> None:
        pair = Pair()
        pair.start()
        pair.a.on_control(B, junk)
        pair.b.on_frame(A, sw.STREAM_TAG + B.encode() + b"\xc1")
        assert [r for r, _ in pair.drops] == [BAD_CONTROL, BAD_CONTROL]
        assert pair.a.counters["bad_control_total"] == 1 and pair.b.counters["bad_control_total"] == 1
    asyncio.run(run())


def test_node_gaps_iterator_and_sys_topic_get_each_gap() -> None:
    """Node._on_gaps: the embedder's ``async for gap in node.gaps()`` and the node-local
    $SYS/zmesh/delivery/gaps topic get every gap; it is counted in drops too."""
    from zmesh.mesh.streams import Gap
    from zmesh.node import SYS_GAPS, Node

    class Sink:
        def __init__(self) -> None:
            self.got: list[tuple[str, bytes]] = []

        def deliver(self, topic: str, payload: bytes, *rest: Any) -> None:
            self.got.append((topic, payload))

        def deliver_plain(self, topic: str, payloads: list[bytes], origin: str) -> None:
            raise AssertionError("a gap is one message")

    async def run() -> None:
        import json

        node = Node(name="n", mqtt=False)
        sink = Sink()
        node.router.subscribe(sink, "$SYS/zmesh/delivery/#", 0)  # type: ignore[arg-type]
        gaps = node.gaps()
        first = asyncio.ensure_future(gaps.__anext__())
        await asyncio.sleep(0)
        node._on_gaps([Gap("K" * 40, 7, 5, None, "origin_restarted"), Gap("K" * 40, 7, 1, 3, "evicted")])
        assert (await first).last is None
        second = await gaps.__anext__()
        assert (second.first, second.last, second.reason) == (1, 3, "evicted")
        assert [t for t, _ in sink.got] == [SYS_GAPS, SYS_GAPS]
        body = json.loads(sink.got[1][1])
        assert (body["first"], body["last"], body["count"], body["reason"]) == (1, 3, 3, "evicted")
        assert node.drops.snapshot()["delivery_gap"] == 4  # 1 (unknown count) + 3
    asyncio.run(run())


def test_more_prefixes_than_a_declaration_holds_asks_for_everything() -> None:
    async def run() -> None:
        pair = Pair()
        pair.start()
        pair.b.set_interest({f"p{i}/".encode() for i in range(sw.DEFAULT_LIMITS.max_prefixes + 1)}, set())
        await _settle(lambda: B in pair.a.interest)
        assert list(pair.a.interest[B]) == [b""]
        pair.a.publish(b"p1500/x", "p1500/x", b"m", 1, None)
        await _settle(lambda: len(pair.released) == 1)
    asyncio.run(run())


def test_a_peer_away_keeps_its_stream_and_interest_until_the_outbox_would_let_go() -> None:
    # The membership forgets a peer down 12 peer expiries; delivery must not: what is
    # published while b is away joins b's stream (same epoch), delivered when b is back.
    # Away longer than outbox_max_age + give_up, b's state goes (nothing left to recover
    # nor an exact range to report).
    async def run() -> None:
        pair = Pair(DeliverySettings(outbox=OutboxConfig(max_age=30.0), streams=StreamConfig(give_up=40.0)))
        pair.start()
        pair.b.set_interest({b"t/"}, set())
        await _settle(lambda: B in pair.a.interest)
        epoch = pair.a.outbox.stream(B, 0.0).epoch
        pair.deliver_to_b = False
        pair.a.peer_down(B)
        down_at = pair.a.down_since[B]
        for i in range(3):
            pair.a.publish(b"t/x", "t/x", f"{i}".encode(), 1, None)
        pair.a.tick(down_at + 29.0)  # away, but within outbox_max_age
        assert B in pair.a.interest and pair.a.outbox.streams[B].epoch == epoch
        assert len(pair.a.outbox.streams[B].entries) == 3
        pair.deliver_to_b = True
        pair.a.peer_up(B)
        await _settle(lambda: len(pair.released) == 3 and not pair.a.outbox.unacknowledged())
        assert [p for _k, _t, p in pair.released] == [b"0", b"1", b"2"]
        assert not pair.gaps
        pair.a.peer_down(B)
        pair.a.tick(pair.a.down_since[B] + 69.0)
        assert B in pair.a.interest  # evicted by now, but b would still be told the range
        pair.a._next_departure_check = 0.0
        pair.a.tick(pair.a.down_since[B] + 71.0)
        assert B not in pair.a.interest and B not in pair.a.outbox.streams and B not in pair.a.down_since
    asyncio.run(run())


def test_a_restarted_receiver_resumes_at_its_stored_position_and_repeats_nothing() -> None:
    # b released 8 messages into its (persistent) sessions but died before acknowledging
    # the last 3; its data_dir kept the position with them. Restarted from that position, it
    # acknowledges them on a's TAIL instead of taking them again (QoS 2's exactly once);
    # restarted from nothing, it would be given 5, 6 and 7 a second time.
    async def run() -> None:
        pair = Pair()
        pair.start()
        pair.b.set_interest({b"t/"}, set())
        await _settle(lambda: B in pair.a.interest)
        for i in range(5):
            pair.a.publish(b"t/x", "t/x", f"{i}".encode(), 1, None)
        await _settle(lambda: len(pair.released) == 5 and not pair.a.outbox.unacknowledged())
        pair.b.send_control = lambda k, d: True  # b's acknowledgements stop: it is about to die
        for i in range(5, 8):
            pair.a.publish(b"t/x", "t/x", f"{i}".encode(), 1, None)
        await _settle(lambda: len(pair.released) == 8)
        position = pair.b.position(A)
        assert position is not None and position[1] == 8
        assert pair.a.outbox.unacknowledged() == {B: 3}
        released: list[bytes] = []
        restarted = Delivery(B, DeliverySettings(), lambda f, n: True, lambda k, d: pair._control(pair.a, B, d),
                             lambda k, e: released.extend(m.payload for m in e), pair.gaps.extend, lambda r, d: None)
        restarted.restore_positions({A: position})
        pair.b = restarted
        restarted.start()
        restarted.peer_up(A)
        restarted.set_interest({b"t/"}, set())
        pair.a.peer_down(B)
        pair.a.peer_up(B)
        pair.a.publish(b"t/x", "t/x", b"8", 1, None)
        await _settle(lambda: released and not pair.a.outbox.unacknowledged())
        assert released == [b"8"]
        assert restarted.inbox.streams[A].position() == (position[0], 9)
        assert not pair.gaps
    asyncio.run(run())


def test_a_restarted_origin_takes_a_known_interest_for_no_late_subscription() -> None:
    """After a restart from its disk store an origin knows each destination's last
    declaration (Delivery.restore_interest): the destination declaring the same again is
    not told it subscribed late (UNCOVERED), while a prefix really new to it still is."""
    async def main() -> tuple[list[Any], list[Any]]:
        sent: list[Any] = []
        d = Delivery(A, DeliverySettings(), lambda f, n: True, lambda k, data: sent.append(sw.decode_control(data)) or True,
                     lambda k, e: None, lambda g: None, lambda r, x: None)
        d.start()
        d.outbox.released_until_ms = 10_000  # messages were let go up to then, before the restart
        d.restore_interest({B: sw.Interest(5, {b"x/": 1_000})})
        d._on_interest(B, sw.Interest(6, {b"x/": 1_000}), 0.0)
        known = [c for c in sent if isinstance(c, sw.Uncovered)]
        sent.clear()
        d._on_interest(B, sw.Interest(7, {b"x/": 1_000, b"y/": 2_000}), 0.0)
        return known, [c for c in sent if isinstance(c, sw.Uncovered)]

    known, new = asyncio.run(main())
    assert known == []
    assert new == [sw.Uncovered(2_000, 10_000)]
