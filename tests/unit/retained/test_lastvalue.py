"""The retained cache's merge: any order and duplication of updates gives the same state."""

from hypothesis import given
from hypothesis import strategies as st

from zmesh.retained.hlc import COUNTER_BITS
from zmesh.retained.lastvalue import BUCKETS, Merge, RetainedCache, RetainedEntry

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
    assert first.digests() == second.digests()  # anti-entropy sees them as equal


@given(st.lists(entries, max_size=12), st.lists(entries, max_size=12))
def test_exchanging_differing_buckets_converges_two_caches(left_updates: list, right_updates: list) -> None:
    left, right = RetainedCache(), RetainedCache()
    for u in left_updates:
        left.merge(u)
    for u in right_updates:
        right.merge(u)
    buckets = left.differing_buckets(right.digests())
    for entry in right.in_buckets(buckets):
        left.merge(entry)
    for entry in left.in_buckets(left.differing_buckets(right.digests())):
        right.merge(entry)
    assert state(left) == state(right) and left.digests() == right.digests()
    assert left.differing_buckets(right.digests()) == set()


def test_empty_payload_deletes_and_the_tombstone_beats_older_copies() -> None:
    cache = RetainedCache()
    cache.merge(RetainedEntry("t", b"v", 1, "a", 10))
    cache.merge(RetainedEntry("t", b"", 0, "a", 20))
    assert cache.get("t") is None and len(cache) == 0
    assert cache.merge(RetainedEntry("t", b"stale", 1, "b", 15)) is Merge.STALE
    assert cache.get("t") is None


def test_match_uses_mqtt_filters_and_the_dollar_rule() -> None:
    cache = RetainedCache()
    for topic in ("a/b", "a/c", "b", "$SYS/x"):
        cache.merge(RetainedEntry(topic, b"v", 0, "n", 1))
    assert [e.topic for e in cache.match("a/+")] == ["a/b", "a/c"]
    assert [e.topic for e in cache.match("#")] == ["a/b", "a/c", "b"]


def test_limits_refuse_new_topics_but_allow_replacing() -> None:
    cache = RetainedCache(max_entries=2, max_bytes=10)
    assert cache.merge(RetainedEntry("a", b"1234", 0, "n", 1)) is Merge.ACCEPTED
    assert cache.merge(RetainedEntry("b", b"1234", 0, "n", 1)) is Merge.ACCEPTED
    assert cache.merge(RetainedEntry("c", b"1", 0, "n", 1)) is Merge.FULL  # entries
    assert cache.merge(RetainedEntry("a", b"123456", 0, "n", 2)) is Merge.ACCEPTED  # 10 bytes
    assert cache.merge(RetainedEntry("b", b"12345", 0, "n", 2)) is Merge.FULL  # 11 bytes
    assert cache.merge(RetainedEntry("b", b"", 0, "n", 3)) is Merge.ACCEPTED  # deletes always fit
    assert (len(cache), cache.live_bytes) == (1, 6)


def test_expiry_hides_then_purges_and_late_copies_are_refused() -> None:
    cache = RetainedCache()
    cache.merge(RetainedEntry("t", b"v", 0, "n", 1, expires_at=1000), now_ms=500)
    assert cache.get("t", now_ms=999) is not None
    assert cache.get("t", now_ms=1000) is None and list(cache.match("#", now_ms=1000)) == []
    assert cache.purge(now_ms=1000, tombstone_ttl_ms=10**9) == ["t"]
    assert cache.merge(RetainedEntry("t", b"v", 0, "n", 1, expires_at=1000), now_ms=1500) is Merge.EXPIRED


def test_tombstones_are_collected_after_their_ttl() -> None:
    cache = RetainedCache()
    cache.merge(RetainedEntry("t", b"", 0, "n", 1000 << COUNTER_BITS))
    assert cache.purge(now_ms=1500, tombstone_ttl_ms=1000) == []
    assert cache.purge(now_ms=2000, tombstone_ttl_ms=1000) == ["t"]
    assert list(cache.all()) == [] and cache.digests() == [0] * BUCKETS
