"""Outcomes kept for `zmesh jobs result`: bounded by age, count and bytes."""

from __future__ import annotations

from zmesh.jobs.bridge import RecentOutcomes


def test_kept_for_a_while_then_gone() -> None:
    kept = RecentOutcomes(keep=10, max_count=10, max_bytes=100)
    kept.add("a", "$jobs/result/a", b"ok", now=0)
    assert kept.get("a", now=10) == ("$jobs/result/a", b"ok")
    assert kept.get("a", now=10.5) is None
    assert kept.get("b", now=0) is None


def test_oldest_forgotten_first_past_count_or_bytes() -> None:
    kept = RecentOutcomes(keep=100, max_count=2, max_bytes=10)
    for name in "abc":
        kept.add(name, f"$jobs/result/{name}", b"x", now=0)
    assert kept.get("a", now=0) is None and len(kept) == 2
    kept.add("big", "$jobs/result/big", b"y" * 9, now=0)
    assert kept.get("b", now=0) is None and kept.get("big", now=0) is not None  # 1 + 9 bytes fit
    kept.add("huge", "$jobs/result/huge", b"z" * 11, now=0)  # larger than the whole budget
    assert kept.get("huge", now=0) is None
