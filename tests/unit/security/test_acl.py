"""Mosquitto ACL files: Mosquitto 2.0's parsing and semantics, errors naming file and line,
and a reference model that check() must agree with on generated rules and topics."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zmesh.security.acl import AclError, AclFile, Decision

ACL = """\
# anonymous clients
topic read public/#
topic deny public/secret

user alice
topic readwrite alice/#
topic read shared/+/status
topic deny shared/hidden/#
topic read shared/#

user bob
topic write bob/in
topic read
pattern deny %u/private/#
topic bob/both

pattern read devices/%u/#
pattern write clients/%c/out
pattern deny devices/+/locked
user admin
topic #
topic $SYS/#
"""


@pytest.fixture(scope="module")
def acl() -> AclFile:
    return AclFile.parse(ACL, "acl")


@pytest.mark.parametrize(
    "user, client, topic, access, allowed, line",
    [
        # topic rules before the first `user` are the anonymous client's
        (None, "c", "public/news", "read", True, 2),
        (None, "c", "public/news", "write", False, None),
        (None, "c", "public/secret", "read", False, 3),  # deny wins over the earlier grant
        ("alice", "c", "public/news", "read", False, None),  # ...and not alice's
        # a user's own rules, in the file's order after the deny rules
        ("alice", "c", "alice/x/y", "write", True, 6),
        ("alice", "c", "shared/a/status", "read", True, 7),
        ("alice", "c", "shared/a/status", "write", False, None),
        ("alice", "c", "shared/hidden/x", "read", False, 8),
        ("alice", "c", "shared/other", "read", True, 9),
        # `topic read` alone is readwrite on a topic named "read", as in Mosquitto
        ("bob", "c", "read", "write", True, 13),
        ("bob", "c", "bob/in", "read", False, None),
        ("bob", "c", "bob/in", "write", True, 12),
        ("bob", "c", "bob/both", "read", True, 15),  # no access word: readwrite
        # patterns apply to everyone, wherever they are in the file; %u and %c substituted
        ("bob", "c", "devices/bob/temp", "read", True, 17),
        ("carol", "c", "devices/carol/temp", "read", True, 17),
        ("carol", "c", "devices/bob/temp", "read", False, None),
        ("carol", "c9", "clients/c9/out", "write", True, 18),
        ("carol", "c9", "clients/c8/out", "write", False, None),
        ("carol", "c", "devices/locked/locked", "read", False, 19),  # pattern deny first
        ("carol", "c", "carol/private/x", "read", False, 14),
        # a user's own grant is checked before the pattern deny (Mosquitto's order)
        ("alice", "c", "alice/private/x", "read", True, 6),
        # %u patterns do not apply to anonymous clients; %c ones do
        (None, "c", "devices//x", "read", False, None),
        (None, "c7", "clients/c7/out", "write", True, 18),
        # '#' and '+' at the start do not match $ topics; a $ rule does
        ("admin", "c", "anything/at/all", "write", True, 21),
        ("admin", "c", "$SYS/broker/load", "read", True, 22),
        ("admin", "c", "$other/x", "read", False, None),
        # a '/' in a username is plain text: it spans levels, as in Mosquitto 2.0
        ("a/b", "c", "devices/a/b/x", "read", True, 17),
        # + or # in a username or client id: patterns refuse it (after the user's own rules)
        ("x+y", "c", "devices/x+y/t", "read", False, None),
        ("carol", "c#", "clients/c#/out", "write", False, None),
        # invalid topics match nothing
        ("admin", "c", "", "read", False, None),
        ("admin", "c", "a/+", "read", False, None),
    ],
)
def test_mosquitto_semantics(
    acl: AclFile, user: str | None, client: str, topic: str, access: str, allowed: bool, line: int | None
) -> None:
    decision = acl.check(user, client, topic, access)  # type: ignore[arg-type]
    assert (decision.allowed, decision.line) == (allowed, line), decision.reason


def test_reasons_quote_the_rule_and_its_line(acl: AclFile) -> None:
    assert acl.check(None, "c", "public/secret", "read") == Decision(
        False, 3, "denied by `topic deny public/secret` at acl:3"
    )
    assert acl.check("bob", "c", "devices/bob/t", "read").reason == (
        "allowed by `pattern read devices/%u/#` at acl:17"
    )
    assert acl.check("carol", "c", "nowhere", "write").reason == "no rule grants write on 'nowhere' to user 'carol'"
    assert "+ or #" in acl.check("x+y", "c", "devices/x+y/t", "read").reason


def test_subscribe_is_granted_as_mosquitto_2_0_does(acl: AclFile) -> None:
    # Mosquitto 2.0.11 answers SUBACK 0 to every subscription with an acl_file and filters
    # each message by read access (the integration test checks this against the real one).
    assert acl.check(None, "c", "secret/#", "subscribe").allowed
    assert acl.check("nobody", "c", "#", "subscribe").allowed


def test_a_u_pattern_is_skipped_for_anonymous_clients_not_left_literal() -> None:
    acl = AclFile.parse("pattern read %u/#\npattern read %c/#\n", "acl")
    assert not acl.check(None, "c", "%u/x", "read").allowed
    assert acl.check(None, "c", "c/x", "read").allowed
    assert acl.check("u", "c", "u/x", "read").allowed


def test_a_user_without_rules_and_no_patterns_gets_nothing() -> None:
    acl = AclFile.parse("user alice\ntopic read a\n", "acl")
    assert not acl.check("bob", "c", "a", "read").allowed
    assert "no rules for user 'bob'" in acl.check("bob", "c", "a", "read").reason
    assert not acl.check(None, "c", "a", "read").allowed


def test_user_sections_merge_and_names_are_trimmed() -> None:
    acl = AclFile.parse("user  alice  \ntopic read a\nuser bob\ntopic read b\nuser alice\ntopic read c\n", "acl")
    assert acl.check("alice", "c", "a", "read").allowed and acl.check("alice", "c", "c", "read").allowed
    assert not acl.check("alice", "c", "b", "read").allowed
    assert acl.users == ("alice", "bob")


def test_spaces_in_topics_and_crlf() -> None:
    acl = AclFile.parse("topic read   my topic/x  \r\ntopic   write w\r\n", "acl")
    assert acl.check(None, "c", "my topic/x", "read").allowed
    assert acl.check(None, "c", "w", "write").allowed


def test_patterns_without_placeholders_warn() -> None:
    acl = AclFile.parse("pattern read a/%c\npattern read b/#\n", "acl")
    assert acl.warnings == ("acl:2: pattern 'b/#' has neither %c nor %u",)


def test_bad_access_is_a_value_error(acl: AclFile) -> None:
    with pytest.raises(ValueError, match="read, write or subscribe"):
        acl.check(None, "c", "t", "publish")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ("topic", "empty topic after 'topic'"),
        ("pattern   ", "empty topic after 'pattern'"),
        ("topic readonly a/b", "invalid access 'readonly'"),
        ("topic read a/#/b", "'#' must be the whole last level"),
        ("topic read a/b#", "'#' must be the whole last level"),
        ("pattern read a+/b", "'+' must be a whole level"),
        ("topic read " + "/".join(["a"] * 202), "more than 201 levels"),
        ("user", "missing username"),
        ("users alice", "unknown keyword 'users'"),
        ("  # indented comment", "first column"),
        ("topic\tread\ta", "a tab is not a separator"),
        ("Topic read a", "unknown keyword 'Topic'"),
        ("topic read a\x00b", "NUL"),
    ],
)
def test_parse_errors_name_file_and_line(line: str, fragment: str) -> None:
    with pytest.raises(AclError) as info:
        AclFile.parse(f"# ok\ntopic read fine\n{line}\n", "/etc/zmesh/acl")
    assert str(info.value).startswith("/etc/zmesh/acl:3: "), str(info.value)
    assert info.value.line == 3 and fragment in str(info.value)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(AclError, match="ACL file not found"):
        AclFile.load(tmp_path / "missing")
    bad = tmp_path / "acl"
    bad.write_bytes(b"topic read a\ntopic read \xff\n")
    with pytest.raises(AclError, match=rf"^{re.escape(str(bad))}:2: not UTF-8"):
        AclFile.load(bad)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(
    ["topic", "pattern", "user", " ", "  ", "\t", "\n", "#", "+", "/", "a", "read", "write",
     "deny", "readwrite", "%u", "%c", "$", "\r", "\x00"]), max_size=40).map("".join))
def test_parser_raises_only_its_own_error(text: str) -> None:
    try:
        acl = AclFile.parse(text, "fuzz")
    except AclError as exc:
        assert str(exc).startswith("fuzz:")
        return
    for user in (None, "a", "a+"):
        for access in ("read", "write", "subscribe"):
            assert isinstance(acl.check(user, "c", "a/b", access).allowed, bool)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_parser_raises_only_its_own_error_on_any_text(text: str) -> None:
    try:
        AclFile.parse(text, "fuzz")
    except AclError as exc:
        assert str(exc).startswith("fuzz:")


# ---------------------------------------------------------------------------- reference model
#
# Written from Mosquitto's documentation and source independently of zmesh.auth.acl: filters
# become regular expressions, placeholders are replaced with re.sub, and a decision is
# "any matching deny refuses, else any matching grant allows", first the client's own topic
# rules, then the patterns.

ACCESS_BITS = {"read": 1, "write": 2, "readwrite": 3, "deny": 0}


def filter_regex(filt: str) -> re.Pattern[str]:
    if filt == "#":
        body = ".*"
    else:
        levels = filt.split("/")
        tail = ""
        if levels[-1] == "#":
            levels, tail = levels[:-1], "(?:/.*)?"  # "a/#" matches "a" too
        body = "/".join("[^/]*" if level == "+" else re.escape(level) for level in levels) + tail
    return re.compile(body, re.DOTALL)


def ref_matches(filt: str, topic: str) -> bool:
    if not topic or "+" in topic or "#" in topic or not filt:
        return False
    if filt.startswith("$") != topic.startswith("$"):
        return False
    return filter_regex(filt).fullmatch(topic) is not None


def ref_check(rules: list[tuple[str, str | None, str, str]], user: str | None, client: str,
              topic: str, access: str) -> bool:
    bit = ACCESS_BITS[access]
    own = [(a, f) for kind, owner, a, f in rules if kind == "topic" and owner == user]
    patterns = [(a, f) for kind, _, a, f in rules if kind == "pattern"]
    if not own and not patterns:
        return False
    matching = [a for a, f in own if ref_matches(f, topic)]
    if "deny" in matching:
        return False
    if any(ACCESS_BITS[a] & bit for a in matching):
        return True
    if patterns:
        if (user is not None and re.search(r"[+#]", user)) or re.search(r"[+#]", client):
            return False
        expanded = [
            (a, re.sub(r"%[cu]", lambda m: client if m.group() == "%c" else user, f))  # type: ignore[arg-type, return-value]
            for a, f in patterns
            if not (user is None and "%u" in f)
        ]
        matching = [a for a, f in expanded if ref_matches(f, topic)]
        if "deny" in matching:
            return False
        return any(ACCESS_BITS[a] & bit for a in matching)
    return False


LEVELS = ["a", "b", "$s", "", "alice", "c1", "a/b", "%u", "xalicey"]
filters = st.lists(st.sampled_from(["a", "b", "$s", "+", "", "alice", "%u", "%c", "x%uy"]), min_size=1, max_size=3).flatmap(
    lambda levels: st.sampled_from(["/".join(levels), "/".join(levels + ["#"]), "#"])
)
rules_strategy = st.lists(
    st.tuples(
        st.sampled_from(["topic", "pattern"]),
        st.sampled_from([None, "alice", "bob", "a/b", "p+q"]),
        st.sampled_from(["read", "write", "readwrite", "deny"]),
        filters,
    ),
    max_size=8,
)


def render(rules: list[tuple[str, str | None, str, str]]) -> str:
    """An ACL file with these rules: anonymous topic rules first, then one section per user."""
    lines = [f"topic {a} {f}" for kind, owner, a, f in rules if kind == "topic" and owner is None]
    lines += [f"pattern {a} {f}" for kind, _, a, f in rules if kind == "pattern"]
    for user in dict.fromkeys(o for k, o, _, _ in rules if k == "topic" and o is not None):
        lines.append(f"user {user}")
        lines += [f"topic {a} {f}" for kind, owner, a, f in rules if kind == "topic" and owner == user]
    return "\n".join(lines) + "\n"


@settings(max_examples=500, deadline=None)
@given(
    rules=rules_strategy,
    user=st.sampled_from([None, "alice", "bob", "a/b", "p+q", "carol"]),
    client=st.sampled_from(["c1", "c/2", "c#3", "alice"]),
    topic=st.lists(st.sampled_from(LEVELS), min_size=1, max_size=4).map("/".join) | st.sampled_from(["a/+", "#"]),
    access=st.sampled_from(["read", "write"]),
)
def test_check_agrees_with_the_reference_model(
    rules: list[tuple[str, str | None, str, str]], user: str | None, client: str, topic: str, access: str
) -> None:
    acl = AclFile.parse(render(rules), "gen")
    expected = ref_check(rules, user, client, topic, access)
    decision = acl.check(user, client, topic, access)  # type: ignore[arg-type]
    assert decision.allowed == expected, (render(rules), user, client, topic, access, decision)
    # the same question again comes from the per-client pattern cache: same answer
    assert acl.check(user, client, topic, access) == decision  # type: ignore[arg-type]
