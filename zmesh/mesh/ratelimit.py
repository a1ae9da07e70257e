"""Token buckets: what one peer may ask of us per interval. Pure: ``now`` is passed in.

A sync request costs a few hundred bytes and may be answered with the whole retained state,
so a peer asking again and again (54 KB of requests once drew 1.32 GB of answers) is
bounded twice, per peer key: in requests, and in answer bytes. The byte bucket may go into
debt: an answer is sent whole once the bucket is positive, whatever it costs (the state may
be larger than any burst we allow, and a late joiner must still get it), and the next one
waits until the debt is paid back at the refill rate. So over any interval ``T`` one peer
gets at most ``burst + rate * T`` bytes plus one answer.

May import: the standard library. Imported by ``mesh.mesh``.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def available(self, now: float) -> bool:
        """Whether something may be taken now (the bucket is positive)."""
        self._refill(now)
        return self.tokens > 0

    def take(self, cost: float, now: float) -> None:
        """Take ``cost`` tokens, into debt if need be."""
        self._refill(now)
        self.tokens -= cost


class PeerLimits:
    """A request bucket and a byte bucket per peer key. Keys are trusted keys (ZAP admits
    no others), so the table is bounded by the trusted ring; ``forget`` drops a peer's."""

    def __init__(self, requests_per_second: float, bytes_per_second: float,
                 request_burst: float, byte_burst: float) -> None:
        self.requests_per_second, self.bytes_per_second = requests_per_second, bytes_per_second
        self.request_burst, self.byte_burst = request_burst, byte_burst
        self._buckets: dict[str, tuple[TokenBucket, TokenBucket]] = {}

    def _pair(self, key: str, now: float) -> tuple[TokenBucket, TokenBucket]:
        pair = self._buckets.get(key)
        if pair is None:
            pair = self._buckets[key] = (
                TokenBucket(self.requests_per_second, self.request_burst, now),
                TokenBucket(self.bytes_per_second, self.byte_burst, now),
            )
        return pair

    def admit(self, key: str, now: float) -> bool:
        """One request of ``key`` now: True (and one request token taken) if both buckets
        allow it, False if it is to be refused."""
        requests, answer_bytes = self._pair(key, now)
        if not requests.available(now) or requests.tokens < 1 or not answer_bytes.available(now):
            return False
        requests.take(1, now)
        return True

    def spent(self, key: str, nbytes: int, now: float) -> None:
        """The answer to ``key``'s admitted request cost ``nbytes``."""
        self._pair(key, now)[1].take(nbytes, now)

    def forget(self, key: str) -> None:
        self._buckets.pop(key, None)
