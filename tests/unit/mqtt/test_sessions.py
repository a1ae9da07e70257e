"""zmesh.mqtt.sessions without sockets: what a session keeps when another user takes it over."""

from __future__ import annotations

from typing import Any

from zmesh.config import MqttConfig
from zmesh.mqtt.session import DROP_NOT_READABLE, Outgoing, QueueBudget, SubscriptionOptions
from zmesh.mqtt.sessions import Session


class FakeBroker:
    delivering_retained = False

    def __init__(self) -> None:
        self.subscribed: set[str] = set()

    def add_subscription(self, subscriber: Any, filt: str, qos: int, retained: bool = True) -> None:
        self.subscribed.add(filt)

    def remove_subscription(self, subscriber: Any, filt: str) -> bool:
        self.subscribed.discard(filt)
        return True


class FakeHub:
    def __init__(self) -> None:
        self.config = MqttConfig()
        self.broker = FakeBroker()
        self.dropped_total = 0
        self.publishing = None
        self.queue_budget = QueueBudget(0)
        self.drops: dict[str, int] = {}

    def drop(self, reason: str, detail: str = "", count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count


class Rules:
    """alice reads and subscribes to everything; mallory only public/#."""

    generation = 0

    def authorize(self, username: str | None, client_id: str, topic: str, access: str) -> bool:
        return username == "alice" or topic.startswith("public/")


def test_a_new_owner_keeps_only_what_its_rights_allow() -> None:
    hub = FakeHub()
    session = Session(hub, "shared-id")  # type: ignore[arg-type]
    rules = Rules()
    assert session.set_owner("alice", rules)
    for filt in ("secret/#", "public/#"):
        session.subscribe(filt, SubscriptionOptions(1), replay=False)
    assert session.may_read("secret/a")  # cached for alice
    for topic in ("secret/a", "public/a", "secret/b", "public/b"):  # two in flight, two queued
        session.window.set_max_inflight(2)
        session.window.offer(Outgoing(topic, b"x", 1, False, None), online=True)
    assert not session.set_owner("alice", rules)  # the same owner: nothing changes
    assert session.set_owner("mallory", rules)
    assert not session.may_read("secret/a")  # the cache was alice's
    assert session.restrict_to_owner() == 2
    assert set(session.subscriptions) == {"public/#"} and hub.broker.subscribed == {"public/#"}
    assert [m.topic for m in session.window.inflight.values()] == ["public/a"]
    assert [m.topic for m in session.window.queue] == ["public/b"]
    assert hub.drops == {DROP_NOT_READABLE: 2} and hub.dropped_total == 2
