"""A job frame from a peer that does not decode costs that frame: dropped and counted."""

from __future__ import annotations

from zmesh.jobs.service import JobService


class _NoPublisher:
    def publish_nowait(self, *args: object, **kwargs: object) -> None:
        raise AssertionError("nothing is published for a bad frame")


def test_a_bad_job_frame_is_dropped_and_counted() -> None:
    dropped: list[tuple[str, str]] = []
    service = JobService(_NoPublisher(), drop=lambda reason, detail: dropped.append((reason, detail)))
    for frame in (b"", b"\xff\xff", b"R" + b"\x00" * 10, b"\x93\x01\x02"):
        service._on_frame("k" * 40, frame)
    assert [reason for reason, _ in dropped] == ["jobs_bad_frame"] * 4
    assert all(detail.startswith("from kkkkkkkk") for _, detail in dropped)
    assert not service.handles and not service.dispatcher.pending
