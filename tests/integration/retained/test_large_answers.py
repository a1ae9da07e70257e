"""Large retained answers do not hold the event loop (issue 14, hole 11): a node holding
200,000 retained topics answers ten SUBSCRIBEs to ``$SYS/zmesh/topics`` and a wildcard
subscriber over all of them while another client's messages keep flowing.

The 200,000 entries are put in by a fake trusted peer's anti-entropy answer (the quickest
honest way into a real node); the node's retained limits are lifted for the test. The
measure is what another client sees: the round trip of its own messages through the node
while the large answers are given (a held loop holds them too), and the node's own stall
count.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import Publisher, Subscriber, wait_until
from tests.integration.mesh.test_hostile_peer import HLC, NOW_MS, Hub
from zmesh.mesh import wire
from zmesh.retained.lastvalue import RetainedEntry

pytestmark = pytest.mark.timeout(240)

COUNT = 200_000
CONFIG = """
[retained]
anti_entropy_interval = 1.0
max_entries = 0
max_bytes = 0
"""


class Pinger:
    """Another client's QoS 0 round trips through the node, every 20 ms, in a thread."""

    def __init__(self, port: int) -> None:
        self.topic = f"ping/{uuid.uuid4().hex[:8]}"
        self.sub = Subscriber(port, self.topic)
        self.pub = Publisher(port)
        self.worst = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            self.pub.client.publish(self.topic, b"ping")
            try:
                self.sub.get(timeout=10)
            except Exception:
                self.worst = max(self.worst, 10.0)
                continue
            self.worst = max(self.worst, time.monotonic() - sent)
            self._stop.wait(0.02)

    def __enter__(self) -> Pinger:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)
        self.sub.close()
        self.pub.close()


def test_large_retained_answers_are_given_in_slices(tmp_path: Path) -> None:
    hub = Hub(tmp_path, CONFIG)
    try:
        stamp = HLC(NOW_MS())
        entries = [RetainedEntry(f"big/{i // 1000}/{i}", b"v", 0, "evil", stamp, None, None) for i in range(COUNT)]
        chunks = wire.sync_chunks(entries)
        answered = []

        def answer(request: wire.ControlMessage) -> list[bytes]:
            if answered:  # everything once; later anti-entropy rounds find nothing new
                return [wire.encode_sync_data([], True, hub.peer.retained_seq)]
            answered.append(True)
            return [wire.encode_sync_data(c, i == len(chunks) - 1, hub.peer.retained_seq) for i, c in enumerate(chunks)]

        hub.peer.sync_answer = answer
        wait_until(lambda: hub.sys_node()["retained"]["entries"] >= COUNT, 120, f"{COUNT} entries synced")
        before = hub.node.loop_stalls()["stalls_total"]

        with Pinger(hub.node.mqtt_port) as pinger:
            subscribers = [Subscriber(hub.node.mqtt_port, "$SYS/zmesh/topics") for _ in range(10)]
            try:
                dumps = [sub.get(timeout=60).payload for sub in subscribers]
            finally:
                for sub in subscribers:
                    sub.close()
        dump_stalls = hub.node.loop_stalls()["stalls_total"] - before
        print(f"$SYS/zmesh/topics x10: worst round trip {pinger.worst * 1000:.0f} ms, {dump_stalls} stalls")
        for payload in dumps:
            dump = json.loads(payload)
            assert len(dump) >= COUNT and dump == sorted(dump, key=lambda e: e["topic"])
        # Built once, in slices: before, each SUBSCRIBE built it anew in one loop turn
        # (~1.2 s each here, 10 stalls). A full garbage collection over a heap this size
        # costs ~80 ms on this machine whatever the node does, hence a bound on stalls, not
        # zero. (The round trip is printed, not asserted: ten clients reading 11 MB each
        # in this test process delay the pinger's own thread as much as the node could.)
        assert dump_stalls <= 3

        before = hub.node.loop_stalls()["stalls_total"]
        with Pinger(hub.node.mqtt_port) as pinger, Subscriber(hub.node.mqtt_port, "big/#") as everything:
            seen = set()
            while len(seen) < COUNT:
                seen.add(everything.get(timeout=30).topic)
        replay_stalls = hub.node.loop_stalls()["stalls_total"] - before
        print(f"replay of {COUNT}: worst round trip {pinger.worst * 1000:.0f} ms, {replay_stalls} stalls")
        # Delivered a slice per loop turn. The matching itself (replica.match: a scan of
        # every topic before hole 2's topic index, O(matches) after) is still one turn.
        hub.stalls_before = hub.node.loop_stalls()["stalls_total"]
        hub.check_healthy()
    finally:
        hub.close()
