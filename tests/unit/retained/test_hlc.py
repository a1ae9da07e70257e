from hypothesis import given
from hypothesis import strategies as st

from zmesh.retained.hlc import HybridClock, physical_ms


def test_monotonic_even_when_the_wall_clock_goes_back() -> None:
    wall = iter([1000, 1000, 900, 900, 2000])
    clock = HybridClock(lambda: next(wall))
    stamps = [clock.now() for _ in range(5)]
    assert stamps == sorted(set(stamps))
    assert physical_ms(stamps[-1]) == 2000


@given(st.lists(st.one_of(st.integers(0, 2**40), st.none()), max_size=50))
def test_after_observing_a_remote_stamp_the_next_local_one_is_larger(events) -> None:
    clock = HybridClock(lambda: 5)
    seen = 0
    for remote in events:
        if remote is None:
            stamp = clock.now()
            assert stamp > seen
            seen = stamp
        elif clock.observe(remote):
            seen = max(seen, remote)


def test_a_remote_stamp_beyond_the_max_offset_is_refused_and_not_observed() -> None:
    wall = 1_000_000
    clock = HybridClock(lambda: wall, max_offset_ms=60_000)
    local = clock.now()
    for remote in (2**64 - 1, 2**63 - 1, (wall + 60_001) << 16, -1):
        assert not clock.observe(remote)
    assert clock.now() == local + 1  # not dragged ahead
    assert clock.observe((wall + 60_000) << 16)  # the bound itself is fine
    assert physical_ms(clock.now()) == wall + 60_000
    assert clock.observe(5)  # an old stamp is harmless: nothing to take in
