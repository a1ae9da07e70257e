"""zmesh.topics: validation, matching, literal prefixes and the subscription trie."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.topics import (
    MAX_TOPIC_BYTES,
    SubscriptionTrie,
    TopicError,
    has_wildcards,
    literal_prefix,
    matches,
    parse_shared,
    validate_topic_filter,
    validate_topic_name,
)

# --------------------------------------------------------------------- spec examples (§4.7)

# (filter, topic, expected): the non-normative examples of MQTT 3.1.1 §4.7 and 5.0 §4.7,
# plus the empty-level and $share cases the specs imply.
SPEC_MATCHES = [
    # multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/tennis/player1/#", "sport/tennis/player2", False),
    ("sport/#", "sport", True),
    ("sport/#", "sport/", True),
    ("sport/#", "sports", False),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    # single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+", "finance", True),
    ("+/tennis/#", "sport/tennis", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    # topics beginning with $
    ("#", "$SYS/x", False),
    ("#", "$SYS", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/x", True),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("+/x", "a$/x", True),  # only a leading $ is special
    ("a/#", "a/$b", True),  # ...and only at the first level
    # case, spaces, leading separator
    ("ACCOUNTS", "Accounts", False),
    ("Accounts payable", "Accounts payable", True),
    ("/finance", "finance", False),
    ("finance", "/finance", False),
    # empty levels are real levels
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/+/b", "a/b", False),
    ("+/+", "/", True),
    ("+", "/", False),
    ("/#", "/", True),
    ("/#", "/a/b", True),
    ("a/b/", "a/b", False),
    ("a/b/#", "a/b/", True),
    # shared subscriptions match via their inner filter
    ("$share/g/sport/#", "sport/tennis", True),
    ("$share/g/sport/+", "sport", False),
    ("$share/g/#", "$SYS/x", False),
    ("$share/g/$SYS/#", "$SYS/x", True),
]


@pytest.mark.parametrize(("filt", "topic", "expected"), SPEC_MATCHES)
def test_spec_examples(filt: str, topic: str, expected: bool) -> None:
    validate_topic_filter(filt)
    validate_topic_name(topic)
    assert matches(filt, topic) is expected
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add(filt, "s", 1)
    assert trie.match(topic) == ([("s", filt, 1)] if expected else [])


VALID_FILTERS = [
    "#", "+", "/", "+/tennis/#", "sport/+/player1", "sport/tennis/#", "+/+", "/+", "//",
    "$SYS/#", "$share", "$shared/x", "$share/g/#", "$share/group/a/+/b", "$share/g/$SYS/+",
    "a b/ü/日本", "x" * MAX_TOPIC_BYTES,
]  # fmt: skip

INVALID_FILTERS = [
    "", "sport/tennis#", "sport/tennis/#/ranking", "sport+", "sport/+tennis", "#/a", "##", "++",
    "a\0b", "x" * (MAX_TOPIC_BYTES + 1), "é" * (MAX_TOPIC_BYTES // 2 + 1), "a\ud800",
    "$share/", "$share/g", "$share//a", "$share/g/", "$share/g+/a", "$share/#/a",
    "$share/g/a#", "$share/g/#/a",
]  # fmt: skip

VALID_NAMES = ["a", "/", "//", "/finance", "$SYS/x", "Accounts payable", "a//b", "ü/日本",
               "$share/g/x", "x" * MAX_TOPIC_BYTES]  # fmt: skip

INVALID_NAMES = ["", "a/+", "+", "#", "a/#", "sport+", "a#b", "a\0b", "\0",
                 "x" * (MAX_TOPIC_BYTES + 1), "€" * (MAX_TOPIC_BYTES // 3 + 1), "\udcff"]  # fmt: skip


@pytest.mark.parametrize("filt", VALID_FILTERS, ids=lambda f: repr(f[:30]))
def test_valid_filters(filt: str) -> None:
    validate_topic_filter(filt)


@pytest.mark.parametrize("filt", INVALID_FILTERS, ids=lambda f: repr(f[:30]))
def test_invalid_filters(filt: str) -> None:
    with pytest.raises(TopicError):
        validate_topic_filter(filt)
    with pytest.raises(TopicError):
        SubscriptionTrie().add(filt, "s")


@pytest.mark.parametrize("name", VALID_NAMES, ids=lambda n: repr(n[:30]))
def test_valid_names(name: str) -> None:
    validate_topic_name(name)


@pytest.mark.parametrize("name", INVALID_NAMES, ids=lambda n: repr(n[:30]))
def test_invalid_names(name: str) -> None:
    with pytest.raises(TopicError):
        validate_topic_name(name)


def test_error_messages_say_what_is_wrong() -> None:
    cases = {
        "": "empty",
        "a\0": "U+0000",
        "sport/tennis#": "alone in its level",
        "sport/tennis/#/ranking": "last level",
        "sport+": "'+' must be alone",
        "$share//a": "empty share name",
        "$share/g": "no topic filter",
    }
    for filt, fragment in cases.items():
        with pytest.raises(TopicError, match=re.escape(fragment)):
            validate_topic_filter(filt)
    with pytest.raises(TopicError, match="wildcard"):
        validate_topic_name("a/+")
    with pytest.raises(TopicError, match="65536 UTF-8 bytes"):
        validate_topic_name("x" * 65536)
    assert issubclass(TopicError, ValueError)


def test_parse_shared() -> None:
    assert parse_shared("$share/g/a/b") == ("g", "a/b")
    assert parse_shared("$share/g/#") == ("g", "#")
    assert parse_shared("a/b") == (None, "a/b")
    assert parse_shared("$share") == (None, "$share")
    assert parse_shared("$shared/g/a") == (None, "$shared/g/a")
    with pytest.raises(TopicError):
        parse_shared("$share/g")


@pytest.mark.parametrize(
    ("filt", "prefix"),
    [
        ("a/b/+/c", "a/b/"),
        ("a/#", "a"),
        ("a/b/#", "a/b"),
        ("a/+/#", "a/"),
        ("a/b", "a/b"),
        ("#", ""),
        ("+", ""),
        ("+/x", ""),
        ("/#", ""),
        ("/+", "/"),
        ("$SYS/#", "$SYS"),
        ("$share/g/a/b/+", "a/b/"),
        ("$share/g/a/#", "a"),
        ("$share/g/a/b", "a/b"),
    ],
)
def test_literal_prefix(filt: str, prefix: str) -> None:
    assert literal_prefix(filt) == prefix


def test_has_wildcards() -> None:
    assert has_wildcards("a/+") and has_wildcards("#") and has_wildcards("$share/g/a/#")
    assert not has_wildcards("a/b") and not has_wildcards("$share/g/a") and not has_wildcards("/")


# ----------------------------------------------------------------------- property-based tests

# A small alphabet so that generated filters and topics actually match often; "$x" exercises
# the $ rule and "" empty levels.
LEVELS = ["a", "b", "", "$x"]

topic_levels = st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4)
topics_st = topic_levels.map("/".join).filter(bool)  # "" is not a valid topic name


@st.composite
def filters_st(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LEVELS, "+"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    filt = "/".join(levels)
    if not filt:
        filt = "+"
    if draw(st.integers(0, 4)) == 0:
        filt = "$share/" + draw(st.sampled_from(["g", "h"])) + "/" + filt
    return filt


def ref_matches(filt: str, topic: str) -> bool:
    """Plain reference: split into levels and compare recursively."""
    if filt.startswith("$share/"):
        filt = filt.split("/", 2)[2]
    if topic.startswith("$") and filt[0] in "+#":
        return False

    def rec(f: list[str], t: list[str]) -> bool:
        if not f:
            return not t
        if f[0] == "#":
            return True  # this level (possibly absent: the parent rule) and all below
        if not t:
            return False
        return (f[0] == "+" or f[0] == t[0]) and rec(f[1:], t[1:])

    return rec(filt.split("/"), topic.split("/"))


def regex_matches(filt: str, topic: str) -> bool:
    """A second, differently built reference: translate the filter into a regex."""
    if filt.startswith("$share/"):
        filt = filt.split("/", 2)[2]
    if topic.startswith("$") and filt[0] in "+#":
        return False
    levels = filt.split("/")
    tail = ""
    if levels[-1] == "#":
        levels.pop()
        tail = "(?:/.*)?" if levels else ".*"
    body = "/".join("[^/]*" if lv == "+" else re.escape(lv) for lv in levels)
    return re.fullmatch(body + tail, topic, re.DOTALL) is not None


@settings(max_examples=250, deadline=None)
@given(filters_st(), topics_st)
def test_matches_agrees_with_references(filt: str, topic: str) -> None:
    validate_topic_filter(filt)
    validate_topic_name(topic)
    expected = ref_matches(filt, topic)
    assert regex_matches(filt, topic) is expected
    assert matches(filt, topic) is expected


@settings(max_examples=150, deadline=None)
@given(filters_st(), topics_st)
def test_literal_prefix_is_prefix_of_every_match(filt: str, topic: str) -> None:
    prefix = literal_prefix(filt)
    if matches(filt, topic):
        assert topic.startswith(prefix)
    inner = parse_shared(filt)[1]
    if not has_wildcards(inner):
        assert prefix == inner
    else:
        # The prefix is made of whole literal levels: nothing past the first wildcard.
        assert inner.startswith(prefix)
        assert "+" not in prefix and "#" not in prefix


@settings(max_examples=150, deadline=None)
@given(filters_st())
def test_literal_prefix_is_prefix_of_topics_built_from_filter(filt: str) -> None:
    # Instantiate the filter's wildcards to get topics it must match, including the
    # parent-level case for '#', so the prefix property is exercised on many matches.
    inner = parse_shared(filt)[1]
    levels = inner.split("/")
    candidates = []
    for fill in ("a", "", "b/c"):
        out: list[str] = []
        for lv in levels:
            if lv == "#":
                candidates.append("/".join(out))  # parent rule
                out.append(fill)
            else:
                out.append(fill.split("/")[0] if lv == "+" else lv)
        candidates.append("/".join(out))
    for topic in candidates:
        if topic and matches(filt, topic):
            assert topic.startswith(literal_prefix(filt)), (filt, topic)


SUBSCRIBERS = ["s1", "s2", "s3"]

ops_st = st.lists(
    st.tuples(
        st.sampled_from(["add", "add", "remove", "remove_subscriber"]),
        filters_st(),
        st.sampled_from(SUBSCRIBERS),
        st.integers(0, 2),
    ),
    max_size=30,
)


@settings(max_examples=100, deadline=None)
@given(ops_st, st.lists(topics_st, min_size=1, max_size=8))
def test_trie_agrees_with_brute_force(
    ops: list[tuple[str, str, str, int]], probe_topics: list[str]
) -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    model: dict[tuple[str, str], int] = {}  # (filter, subscriber) -> value
    version = trie.version
    for op, filt, sub, value in ops:
        if op == "add":
            new = trie.add(filt, sub, value)
            assert new is ((filt, sub) not in model)
            model[(filt, sub)] = value
            changed = True
        elif op == "remove":
            removed = trie.remove(filt, sub)
            assert removed is ((filt, sub) in model)
            model.pop((filt, sub), None)
            changed = removed
        else:
            gone = [key for key in model if key[1] == sub]
            assert trie.remove_subscriber(sub) == len(gone)
            for key in gone:
                del model[key]
            changed = bool(gone)
        assert (trie.version > version) is changed
        version = trie.version
        assert len(trie) == len(model)

    assert trie.filters() == {f for f, _ in model}
    for sub in SUBSCRIBERS:
        assert trie.filters_of(sub) == {f: v for (f, s), v in model.items() if s == sub}
    for topic in [*probe_topics, "a", "$x", "a/b", "/", "$x/a/b"]:
        expected = sorted((s, f, v) for (f, s), v in model.items() if matches(f, topic))
        assert sorted(trie.match(topic)) == expected, topic

    # Removing every subscriber empties the trie completely, nodes included (pruning).
    for sub in SUBSCRIBERS:
        trie.remove_subscriber(sub)
    assert len(trie) == 0
    assert trie.filters() == set()
    assert trie._root.children == {} and trie._root.subs == {}


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(filters_st(), st.sampled_from(SUBSCRIBERS)), max_size=20))
def test_remove_each_pair_prunes_everything(pairs: list[tuple[str, str]]) -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    for filt, sub in pairs:
        trie.add(filt, sub)
    for filt, sub in pairs:
        trie.remove(filt, sub)
    assert len(trie) == 0 and trie.filters() == set()
    assert trie._root.children == {}


# ---------------------------------------------------------------------------- trie behaviour


def test_trie_basics() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    assert trie.add("a/+", "s1", 0) is True
    assert trie.add("a/#", "s1", 1) is True
    assert trie.add("a/b", "s2", 2) is True
    assert trie.add("a/+", "s1", 2) is False  # re-add replaces the value
    assert len(trie) == 3
    assert sorted(trie.match("a/b")) == [("s1", "a/#", 1), ("s1", "a/+", 2), ("s2", "a/b", 2)]
    assert trie.match("a") == [("s1", "a/#", 1)]  # parent rule
    assert trie.match("b") == []
    assert trie.filters() == {"a/+", "a/#", "a/b"}
    assert trie.filters_of("s1") == {"a/+": 2, "a/#": 1}
    assert trie.filters_of("nobody") == {}
    assert trie.remove("a/b", "s1") is False
    assert trie.remove("a/b", "s2") is True
    assert trie.remove_subscriber("s1") == 2
    assert trie.remove_subscriber("s1") == 0
    assert len(trie) == 0 and trie.filters() == set()


def test_trie_shared_and_plain_on_same_levels() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("a/b", "s1", 0)
    trie.add("$share/g/a/b", "s1", 1)
    trie.add("$share/h/a/+", "s2", 1)
    assert sorted(trie.match("a/b")) == [
        ("s1", "$share/g/a/b", 1),
        ("s1", "a/b", 0),
        ("s2", "$share/h/a/+", 1),
    ]
    assert trie.filters() == {"a/b", "$share/g/a/b", "$share/h/a/+"}
    assert trie.remove("$share/g/a/b", "s1")
    assert sorted(trie.match("a/b")) == [("s1", "a/b", 0), ("s2", "$share/h/a/+", 1)]


def test_trie_dollar_rule() -> None:
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    for filt in ("#", "+/monitor/Clients", "$SYS/#", "$SYS/monitor/+"):
        trie.add(filt, filt)
    assert sorted(s for s, _, _ in trie.match("$SYS/monitor/Clients")) == [
        "$SYS/#",
        "$SYS/monitor/+",
    ]
    assert sorted(s for s, _, _ in trie.match("x/monitor/Clients")) == ["#", "+/monitor/Clients"]


def test_version_bumps_only_on_change() -> None:
    trie: SubscriptionTrie[int] = SubscriptionTrie()
    v0 = trie.version
    trie.add("a", 1)
    v1 = trie.version
    assert v1 > v0
    assert not trie.remove("b", 1) and trie.version == v1
    assert trie.remove_subscriber(2) == 0 and trie.version == v1
    trie.add("a", 1, "new value")
    assert trie.version > v1


def test_trie_match_on_wildcard_level_topic_does_not_duplicate() -> None:
    # Topics are validated before matching, but a stray "+" level must not reach the '+' node
    # both as a wildcard and as a literal (the answer stays that of `matches`).
    trie: SubscriptionTrie[str] = SubscriptionTrie()
    trie.add("a/+", "s")
    assert matches("a/+", "a/+")
    assert trie.match("a/+") == [("s", "a/+", None)]
