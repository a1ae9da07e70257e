"""Which client publishes under ``$jobs/`` the bridge lets through (issue 14, hole 12)."""

from __future__ import annotations

from typing import Any

from zmesh.jobs.bridge import NOT_LEASE_HOLDER, RESERVED_TOPIC, JobBridge


class _Session:
    def __init__(self, client_id: str) -> None:
        self.client_id = client_id


def _bridge(dropped: list[tuple[str, str]]) -> tuple[JobBridge, _Session, _Session]:
    bridge = JobBridge(None, None, "n", lambda reason, detail: dropped.append((reason, detail)))  # type: ignore[arg-type]
    holder, other = _Session("holder"), _Session("other")
    held: Any = (object(), holder, object())
    bridge.items["j1"] = held
    bridge.items["team/j2"] = held  # ids from $jobs/submit/QUEUE/ID may hold slashes
    return bridge, holder, other


def test_only_the_holder_answers_and_node_topics_are_the_nodes() -> None:
    dropped: list[tuple[str, str]] = []
    bridge, holder, other = _bridge(dropped)
    for answer in ("done", "fail", "extend"):
        assert bridge.refusal(f"$jobs/{answer}/j1", holder) is None
        assert bridge.refusal(f"$jobs/{answer}/team/j2", holder) is None
        assert bridge.refusal(f"$jobs/{answer}/j1", other) == NOT_LEASE_HOLDER
        # Unknown and not held look the same to a client.
        assert bridge.refusal(f"$jobs/{answer}/nope", holder) == NOT_LEASE_HOLDER
    for topic in ("$jobs/submit/scan", "$jobs/submit/scan/id", "$jobs/dead/scan"):
        assert bridge.refusal(topic, other) is None
    for topic in ("$jobs/result/j1", "$jobs/failed/j1", "$jobs/queue/scan/j1", "$jobs/anything"):
        assert bridge.refusal(topic, holder) == RESERVED_TOPIC
    assert dropped == []  # refusal() only judges; may_publish() counts
    assert not bridge.may_publish("$jobs/done/j1", other)
    assert bridge.may_publish("$jobs/done/j1", holder)
    assert dropped == [(NOT_LEASE_HOLDER, "client 'other' published to '$jobs/done/j1'")]
