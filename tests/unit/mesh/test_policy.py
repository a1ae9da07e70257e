"""The mesh policy's rule choice and topic gate (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zmesh import topics
from zmesh.mesh.policy import MeshPolicy, PolicyError, TopicGate, validate_rules

KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"


def test_no_rules_means_every_peer_is_unrestricted() -> None:
    policy = MeshPolicy()
    assert not policy
    assert policy.gate_for("anyone", KEY) is None


def test_first_matching_rule_decides_and_unnamed_peers_are_free() -> None:
    policy = MeshPolicy([("scanner-1", ["special/#"]), ("scanner-*", ["scans/#"])])
    gate = policy.gate_for("scanner-1", KEY)
    assert gate is not None and gate.allows("special/x") and not gate.allows("scans/x")
    gate = policy.gate_for("scanner-7", KEY)
    assert gate is not None and gate.allows("scans/a/b") and not gate.allows("alerts/x")
    assert policy.gate_for("ops", KEY) is None


def test_catch_all_empty_rule_denies_everyone_unnamed() -> None:
    gate = MeshPolicy([("ops", ["#"]), ("*", [])]).gate_for("stranger", KEY)
    assert gate is not None and not gate.allows("anything")


def test_a_rule_by_key_matches_only_that_key() -> None:
    policy = MeshPolicy([(f"key:{KEY}", ["a/#"])])
    gate = policy.gate_for("whatever", KEY)
    assert gate is not None and gate.allows("a/b") and not gate.allows("b")
    assert policy.gate_for("whatever", KEY[::-1]) is None


def test_unknown_name_matches_only_key_rules() -> None:
    # A key without a name in our trusted directory cannot match a name glob, not even "*".
    assert MeshPolicy([("*", [])]).gate_for(None, KEY) is None


def test_hash_does_not_match_dollar_topics() -> None:
    gate = TopicGate(("#",))
    assert gate.allows("a/b") and not gate.allows("$jobs/submit/q")


@pytest.mark.parametrize(
    "rules, message",
    [
        ([("", ["a"])], "non-empty"),
        ([("x", "a/#")], "array"),
        ([("x", ["a/#/b"])], "'#' must be the last level"),
        ([("x", [3])], "topic filter strings"),
        ([("x", ["$share/g/a"])], "shared subscription"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(rules: list, message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        validate_rules(rules)


levels = st.sampled_from(["a", "b", "c", "+", "#", ""])


@given(st.lists(st.lists(levels, min_size=1, max_size=4).map("/".join), max_size=4),
       st.lists(st.sampled_from(["a", "b", "c", ""]), min_size=1, max_size=4).map("/".join))
def test_gate_agrees_with_the_topic_matcher(filters: list[str], topic: str) -> None:
    valid = []
    for filt in filters:
        try:
            topics.validate_topic_filter(filt)
        except topics.TopicError:
            continue
        valid.append(filt)
    gate = TopicGate(tuple(valid))
    expected = any(topics.matches(f, topic) for f in valid)
    assert gate.allows(topic) is expected
    assert gate.allows(topic) is expected  # and the cached answer is the same
