"""Token buckets per peer (zmesh.mesh.ratelimit): requests and answer bytes, with debt."""

from __future__ import annotations

from zmesh.mesh.ratelimit import PeerLimits, TokenBucket


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket(rate=2.0, burst=4.0, now=0.0)
    bucket.take(4, 0.0)
    assert not bucket.available(0.0)
    assert bucket.available(0.1) and abs(bucket.tokens - 0.2) < 1e-9
    assert bucket.available(100.0) and bucket.tokens == 4.0


def test_requests_are_bounded_per_peer_and_peers_do_not_share() -> None:
    limits = PeerLimits(requests_per_second=1.0, bytes_per_second=1e9, request_burst=3, byte_burst=1e9)
    assert [limits.admit("a", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert limits.admit("b", 0.0)  # another key has its own buckets
    assert not limits.admit("a", 0.5) and limits.admit("a", 1.0)


def test_one_answer_may_exceed_the_byte_burst_and_the_debt_is_paid_back() -> None:
    limits = PeerLimits(requests_per_second=100.0, bytes_per_second=1000.0, request_burst=100, byte_burst=4000)
    assert limits.admit("a", 0.0)
    limits.spent("a", 10_000, 0.0)  # the whole state, larger than the burst: sent anyway
    assert not limits.admit("a", 5.0)  # still 1000 in debt
    assert limits.admit("a", 6.5)
    # Over any interval: at most burst + rate * T bytes, plus one answer.
    sent, now = 0, 0.0
    limits = PeerLimits(100.0, 1000.0, 100, 4000)
    while now < 10.0:
        if limits.admit("x", now):
            limits.spent("x", 3000, now)
            sent += 3000
        now += 0.01
    assert sent <= 4000 + 1000 * 10 + 3000


def test_forget_drops_a_peer_s_buckets() -> None:
    limits = PeerLimits(1.0, 1.0, 1, 1)
    assert limits.admit("a", 0.0) and not limits.admit("a", 0.0)
    limits.forget("a")
    assert limits.admit("a", 0.0)
