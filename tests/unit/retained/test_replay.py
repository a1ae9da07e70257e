"""Large retained answers in slices (zmesh.retained.replay): same messages as in one go,
no stale value after a newer one, and one $SYS/zmesh/topics build per state."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from zmesh.retained import replay
from zmesh.retained.lastvalue import RetainedCache, RetainedEntry


def _cache(n: int) -> RetainedCache:
    cache = RetainedCache()
    for i in range(n):
        cache.merge(RetainedEntry(f"t/{i:05d}", b"v", 0, "a", 1))
    return cache


def test_a_replay_goes_out_a_slice_per_turn_and_skips_what_was_rewritten_meanwhile() -> None:
    async def main() -> None:
        cache = _cache(3 * replay.REPLAY_SLICE)
        replays = replay.Replays(cache)
        got: list[str] = []
        entries = list(cache.match("t/#"))
        replays.start("sub", "t/#", entries, lambda e, p: got.append(e.topic))
        assert len(got) == replay.REPLAY_SLICE  # the first slice at once, the rest later
        late = entries[-1].topic
        cache.merge(RetainedEntry(late, b"newer", 0, "a", 2))  # (delivered live meanwhile)
        while len(replays):
            await asyncio.sleep(0)
        assert got == [e.topic for e in entries if e.topic != late]

    asyncio.run(main())


def test_an_unsubscribed_replay_stops() -> None:
    async def main() -> None:
        cache = _cache(3 * replay.REPLAY_SLICE)
        replays = replay.Replays(cache)
        got: list[str] = []
        replays.start("sub", "t/#", list(cache.match("t/#")), lambda e, p: got.append(e.topic))
        replays.cancel("sub")
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(got) == replay.REPLAY_SLICE

    asyncio.run(main())


def test_the_topics_dump_is_the_same_in_slices_and_built_once_per_state() -> None:
    async def main() -> None:
        cache = _cache(3 * replay.DUMP_SLICE + 7)
        cache.merge(RetainedEntry("t/00001", b"", 0, "a", 9))  # a tombstone is not listed
        dump = replay.TopicsDump(cache)
        got: list[bytes] = []
        for _ in range(3):
            dump.get(got.append)
        while len(got) < 3:
            await asyncio.sleep(0)
        expected: list[dict[str, Any]] = [
            {"topic": e.topic, "bytes": len(e.payload), "origin": e.origin}
            for e in sorted(cache.live(), key=lambda e: e.topic)
        ]
        assert json.loads(got[0]) == expected and got[0] == got[1] == got[2]
        assert dump.cached() is got[0]  # one build shared
        cache.merge(RetainedEntry("t/new", b"x", 0, "a", 1))
        assert dump.cached() is None  # the state changed: built again on the next ask

    asyncio.run(main())
