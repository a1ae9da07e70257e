from hypothesis import given
from hypothesis import strategies as st

from zmesh.hlc import HybridClock, physical_ms


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
        else:
            clock.observe(remote)
            seen = max(seen, remote)
