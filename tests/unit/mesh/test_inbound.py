"""What a peer sends is checked as a client's input is (zmesh.mesh.inbound)."""

from __future__ import annotations

from typing import Any

import pytest

from zmesh.mesh import inbound


@pytest.mark.parametrize("topic", ["$SYS/zmesh/node", "$SYS", "$SYS/x", "a/+", "#", "a/#", "", "a\0b",
                                   "x" * 65_536, "$jobs/done/1", "$jobs/submit/q", "\ud800"])
def test_topics_a_client_could_not_publish_or_that_never_leave_a_node_are_refused(topic: str) -> None:
    with pytest.raises(inbound.Refused) as caught:
        inbound.check_topic(topic)
    assert caught.value.reason == inbound.BAD_TOPIC


@pytest.mark.parametrize("topic", ["a", "a/b", "$jobs/dead/q", "$other/x", "é/ü", "x" * 65_535])
def test_valid_topics_pass(topic: str) -> None:
    inbound.check_topic(topic)


@pytest.mark.parametrize("properties", [
    {"no_such_property": 1}, {"topic_alias": 3}, {"subscription_identifier": 1},
    {"content_type": 5}, {"content_type": "a\0"}, {"content_type": "x" * 70_000},
    {"user_property": "x"}, {"user_property": [["a"]]}, {"user_property": [["a", 1]]},
    {"message_expiry_interval": -1}, {"message_expiry_interval": 2**32}, {"message_expiry_interval": "1"},
    {"payload_format_indicator": 2}, {"payload_format_indicator": True},
    {"correlation_data": "text"}, {"correlation_data": b"x" * 70_000},
    {"response_topic": "a/+"}, {"response_topic": ""},
    {"user_property": [["k" * 60_000, "v" * 60_000]] * 5},  # encodable, but too large a block
])
def test_properties_a_client_could_not_send_are_refused(properties: dict[str, Any]) -> None:
    with pytest.raises(inbound.Refused) as caught:
        inbound.check_properties(properties)
    assert caught.value.reason == inbound.BAD_PROPERTIES


def test_valid_properties_pass_normalised() -> None:
    given = {"payload_format_indicator": 1, "message_expiry_interval": 60, "content_type": "text/plain",
             "response_topic": "r/1", "correlation_data": b"\x01", "user_property": [["a", "b"], ["a", "c"]]}
    assert inbound.check_properties(given) == {**given, "user_property": [("a", "b"), ("a", "c")]}
    assert inbound.check_properties(None) is None and inbound.check_properties({}) is None


def test_origins_hosts_keys_queues_and_job_ids() -> None:
    inbound.check_origin("node-1.a_b")
    for bad in ("", "a b", "x" * 65, 5):
        with pytest.raises(inbound.Refused):
            inbound.check_origin(bad)  # type: ignore[arg-type]
    assert inbound.valid_host("10.1.2.3") and inbound.valid_host("::1") and inbound.valid_host("a.b-c.d")
    assert not any(inbound.valid_host(h) for h in ("", "a b", "tcp://x", "x:1", "a" * 254, "-a", None))
    assert inbound.valid_key("rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7") and not inbound.valid_key("short")
    assert inbound.valid_queue("work") and inbound.valid_queue("$share/g/a/+/b")
    assert not any(inbound.valid_queue(q) for q in ("", "a/b", "a+", "q" * 5000, "$share/g", "$share//a", "$share/g/a/#/b"))
    assert inbound.valid_job_id("0123abc") and inbound.valid_job_id("a/b")
    assert not any(inbound.valid_job_id(j) for j in ("", "a+b", "#", "j" * 1025, "a\0"))
