"""Shared subscriptions through the embedding API: real nodes, real CURVE sockets on
loopback. ``$share/GROUP/FILTER``: each message to exactly one member of the group, on any
node; ordinary subscribers and other groups still get every message."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import make_certs
from tests.integration.test_python_api import two_nodes
from zmesh import Node, Subscription


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    return make_certs(tmp_path / "certs", ["one", "two"])


def key(node: Node) -> str:
    assert node.transport is not None
    return node.transport.identity.public.decode()


async def until_group_known(publisher: Node, group: str, *nodes: Node) -> None:
    """Until ``publisher`` knows that each of ``nodes`` has members of ``group``."""
    async with asyncio.timeout(10):
        while not all((key(n), group) in publisher.jobs.dispatcher.workers for n in nodes):
            await asyncio.sleep(0.02)


async def drain(subscription: Subscription, quiet: float = 0.3) -> list[bytes]:
    """Every message until none arrives for ``quiet`` seconds (after the publisher's last
    message has been seen elsewhere, so this is a bound, not a guess)."""
    got = []
    while True:
        try:
            got.append((await subscription.get(timeout=quiet)).payload)
        except TimeoutError:
            return got


def test_each_message_goes_to_one_member_mesh_wide_and_groups_and_plain_subscribers_get_all(certs: Path) -> None:
    async def main() -> tuple[list[bytes], list[bytes], list[bytes], list[bytes], list[bytes]]:
        async with two_nodes(certs) as (one, two):
            a1 = one.subscribe("$share/scan/jobs/+", qos=1)
            a2 = two.subscribe("$share/scan/jobs/+", qos=1)
            b = two.subscribe("$share/audit/jobs/#", qos=1)
            plain = two.subscribe("jobs/+", qos=1)
            await until_group_known(one, "$share/scan/jobs/+", one, two)
            await until_group_known(one, "$share/audit/jobs/#", two)
            sent = [f"m{i}".encode() for i in range(300)]
            for payload in sent:
                await one.publish("jobs/new", payload, qos=1)
            everything = [(await plain.get(timeout=10)).payload for _ in sent]
            audit = [(await b.get(timeout=10)).payload for _ in sent]
            return everything, audit, await drain(a1), await drain(a2), sent

    everything, audit, first, second, sent = asyncio.run(main())
    assert everything == sent and sorted(audit) == sorted(sent)
    counts = Counter(first + second)
    assert set(counts) == set(sent) and set(counts.values()) == {1}, "each message exactly once in the group"
    assert first and second, "both members, on both nodes, took part"


def test_messages_a_member_never_took_go_to_another_member(certs: Path) -> None:
    async def main() -> tuple[list[bytes], list[bytes], list[bytes]]:
        async with two_nodes(certs) as (one, two):
            leaving = two.subscribe("$share/g/t", qos=1, maxsize=10)
            await until_group_known(one, "$share/g/t", two)
            sent = [f"m{i}".encode() for i in range(30)]
            for payload in sent:
                await one.publish("t", payload, qos=1)
            taken = [(await leaving.get(timeout=10)).payload for _ in range(3)]  # acknowledged
            async with asyncio.timeout(10):  # its buffer (10) and credit fill up
                while len(leaving._buffer) < 10:
                    await asyncio.sleep(0.01)
            staying = one.subscribe("$share/g/t", qos=1)
            leaving.close()  # never took the rest: given back, delivered to `staying`
            rest = [(await staying.get(timeout=10)).payload for _ in range(len(sent) - 3)]
            return taken, rest, sent

    taken, rest, sent = asyncio.run(main())
    assert sorted(taken + rest) == sorted(sent) and len(set(taken) & set(rest)) == 0


def test_a_shared_subscription_gets_no_retained_messages(certs: Path) -> None:
    async def main() -> tuple[list[bytes], bytes]:
        async with two_nodes(certs) as (one, two):
            await one.publish("status", b"old", qos=1, retain=True)
            plain = two.subscribe("status")
            assert (await plain.get(timeout=10)).payload == b"old"  # replicated to two
            shared = two.subscribe("$share/g/status")
            await until_group_known(one, "$share/g/status", two)
            await one.publish("status", b"live", qos=1)
            return await drain(shared), (await plain.get(timeout=10)).payload

    shared, live = asyncio.run(main())
    assert live == b"live" and shared == [b"live"]


def test_queue_names_of_shared_subscriptions_are_not_job_queues(certs: Path) -> None:
    async def main() -> None:
        async with two_nodes(certs) as (one, _two):
            with pytest.raises(ValueError, match="shared"):
                await one.submit("$share/g/t", b"x")
            with pytest.raises(ValueError, match="shared"):
                one.work("$share/g/t")

    asyncio.run(main())
