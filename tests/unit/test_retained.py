"""The retained cache's merge: any order and duplication of updates gives the same state."""

from hypothesis import given
from hypothesis import strategies as st

from zmesh.retained import RetainedCache, RetainedEntry

entries = st.builds(
    RetainedEntry,
    topic=st.sampled_from(["a", "a/b", "c"]),
    payload=st.sampled_from([b"", b"1", b"2"]),
    qos=st.just(0),
    origin=st.sampled_from(["n1", "n2"]),
    timestamp=st.integers(0, 5),
)


def state(cache: RetainedCache) -> dict:
    return {e.topic: e.payload for e in cache.live()}


@given(st.lists(entries, max_size=12), st.randoms())
def test_merge_is_order_independent_and_idempotent(updates: list, rnd) -> None:
    first, second = RetainedCache(), RetainedCache()
    for u in updates:
        first.merge(u)
    shuffled = updates + updates
    rnd.shuffle(shuffled)
    for u in shuffled:
        second.merge(u)
    assert state(first) == state(second)


def test_empty_payload_deletes_and_the_tombstone_beats_older_copies() -> None:
    cache = RetainedCache()
    cache.merge(RetainedEntry("t", b"v", 1, "a", 10))
    cache.merge(RetainedEntry("t", b"", 0, "a", 20))
    assert cache.get("t") is None and len(cache) == 0
    assert not cache.merge(RetainedEntry("t", b"stale", 1, "b", 15))
    assert cache.get("t") is None


def test_match_uses_mqtt_filters_and_the_dollar_rule() -> None:
    cache = RetainedCache()
    for topic in ("a/b", "a/c", "b", "$SYS/x"):
        cache.merge(RetainedEntry(topic, b"v", 0, "n", 1))
    assert [e.topic for e in cache.match("a/+")] == ["a/b", "a/c"]
    assert [e.topic for e in cache.match("#")] == ["a/b", "a/c", "b"]
