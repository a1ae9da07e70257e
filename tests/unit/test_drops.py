"""Counted drops: counted always, logged at WARNING once per reason per interval."""

from __future__ import annotations

import logging

import pytest

from zmesh.drops import DETAIL_LIMIT, OTHER, Drops


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_every_drop_is_counted_but_only_the_first_per_interval_warns(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    drops = Drops(logging.getLogger("zmesh.test"), now=clock, summary_interval=60)
    with caplog.at_level(logging.DEBUG, logger="zmesh.test"):
        for _ in range(1000):
            drops.drop("mesh_bad_frame", "peer x")
        drops.drop("mqtt_bad_packet")
    assert drops.counts == {"mesh_bad_frame": 1000, "mqtt_bad_packet": 1}
    assert drops.total == 1001
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["dropped 1 (mesh_bad_frame): peer x", "dropped 1 (mqtt_bad_packet)"]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 999
    caplog.clear()
    clock.t += 61
    with caplog.at_level(logging.WARNING, logger="zmesh.test"):
        drops.drop("mesh_bad_frame")
    assert [r.getMessage() for r in caplog.records] == ["dropped 1 (mesh_bad_frame) (999 more since the last warning)"]


def test_reasons_and_details_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    drops = Drops(logging.getLogger("zmesh.test"), now=Clock(), max_reasons=3)
    with caplog.at_level(logging.WARNING, logger="zmesh.test"):
        for i in range(10):
            drops.drop(f"r{i}", "x" * 10_000)
    assert set(drops.counts) == {"r0", "r1", "r2", OTHER} and drops.counts[OTHER] == 7
    assert all(len(r.getMessage()) < DETAIL_LIMIT + 100 for r in caplog.records)
