"""zmesh.retained.topicindex: the topic tree answers exactly what matching every stored topic
against the filter would, ``$`` rule included, whatever was added and removed."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.retained.topicindex import TopicIndex
from zmesh.topics import matches

LEVELS = st.sampled_from(["a", "b", "", "$SYS", "$x", "c d"])
TOPICS = st.lists(LEVELS, min_size=1, max_size=4).map("/".join)
FILTER_LEVELS = st.sampled_from(["a", "b", "", "$SYS", "+", "c d"])


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(FILTER_LEVELS, min_size=1, max_size=4))
    if draw(st.booleans()):
        levels.append("#")
    return "/".join(levels)


@given(st.lists(TOPICS, max_size=40), st.lists(TOPICS, max_size=20), st.lists(filters(), min_size=1, max_size=8))
@settings(max_examples=300, deadline=None)
def test_match_agrees_with_matching_every_topic(added: list[str], removed: list[str], filts: list[str]) -> None:
    index = TopicIndex()
    for topic in added:
        index.add(topic)
    for topic in removed:
        index.discard(topic)
    stored = set(added) - set(removed)
    assert len(index) == len(stored)
    for filt in filts:
        assert sorted(index.match(filt)) == sorted(t for t in stored if matches(filt, t)), filt


def test_removing_everything_leaves_an_empty_tree() -> None:
    index = TopicIndex()
    for topic in ("a/b/c", "a/b", "a", "x/y"):
        index.add(topic)
    for topic in ("a/b/c", "a/b", "a", "x/y", "never/there"):
        index.discard(topic)
    assert len(index) == 0 and index._root == {}
