"""MQTT topic names and filters (MQTT 3.1.1 §4.7, 5.0 §4.7/§4.8.2) and a subscription trie. Pure.

Everything here works on ``str`` levels split on ``/``: no regular expressions, because every
published message is matched and a dict lookup per level is far cheaper than a regex engine.

Rules implemented, with the spec's wording in mind:

* a topic name or filter is at least one character, at most 65535 UTF-8 bytes, well-formed
  UTF-8 (no lone surrogates) and never contains U+0000;
* a topic name contains neither ``+`` nor ``#``;
* in a filter ``#`` is alone in its level and is the last level; ``+`` is alone in its level;
* ``+`` matches exactly one level, which may be empty; ``#`` matches its parent level and any
  number of levels below (``a/#`` matches ``a``, ``a/`` and ``a/b/c``);
* empty levels are real levels (``/a`` has two levels, ``a//b`` three);
* a filter whose first character is a wildcard does not match a topic starting with ``$``;
* ``$share/GROUP/filter`` is a shared subscription: GROUP is non-empty and holds no ``+``, ``#``
  or ``/``; it matches exactly what its inner filter matches.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, Generic, TypeVar

__all__ = [
    "MAX_TOPIC_BYTES",
    "SHARE_PREFIX",
    "SubscriptionTrie",
    "TopicError",
    "has_wildcards",
    "literal_prefix",
    "matches",
    "parse_shared",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES = 65535  # the length field of an MQTT UTF-8 string is two bytes
SHARE_PREFIX = "$share/"
_SHARE_LEN = len(SHARE_PREFIX)
# Below this many code points a string cannot exceed MAX_TOPIC_BYTES even at 4 bytes each.
_SAFE_CHARS = MAX_TOPIC_BYTES // 4


class TopicError(ValueError):
    """An invalid topic name or filter; the message says what is wrong."""


# ---------------------------------------------------------------------------------- validation


def _check_string(text: str, what: str) -> None:
    """The checks common to names and filters: non-empty, no NUL, well-formed, not too long."""
    if not text:
        raise TopicError(f"{what} is empty")
    if "\0" in text:
        raise TopicError(f"{what} {text!r} contains U+0000")
    if len(text) <= _SAFE_CHARS and text.isascii():
        return  # the common case: no need to encode just to count bytes
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        # A Python str may carry lone surrogates (e.g. from surrogateescape); MQTT forbids
        # U+D800..U+DFFF and they could not be put on the wire anyway.
        raise TopicError(f"{what} {text[:80]!r} is not well-formed UTF-8: {exc.reason}") from None
    if size > MAX_TOPIC_BYTES:
        raise TopicError(f"{what} is {size} UTF-8 bytes, more than {MAX_TOPIC_BYTES}")


def validate_topic_name(name: str) -> None:
    """Raise TopicError unless ``name`` is a valid topic name (what a PUBLISH carries)."""
    _check_string(name, "topic name")
    if "+" in name or "#" in name:
        raise TopicError(f"topic name {name!r} contains a wildcard ('+' or '#')")


def _check_filter_levels(filt: str, what: str) -> None:
    if "+" not in filt and "#" not in filt:
        return  # no wildcard: every level is literal and valid
    levels = filt.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if "#" in level:
            if level != "#":
                raise TopicError(f"{what} {filt!r}: '#' must be alone in its level, not {level!r}")
            if i != last:
                raise TopicError(f"{what} {filt!r}: '#' must be the last level")
        elif "+" in level and level != "+":
            raise TopicError(f"{what} {filt!r}: '+' must be alone in its level, not {level!r}")


def validate_topic_filter(filt: str) -> None:
    """Raise TopicError unless ``filt`` is a valid topic filter, shared (``$share/g/f``) or not."""
    _check_string(filt, "topic filter")
    if filt.startswith(SHARE_PREFIX):
        group, inner = parse_shared(filt)
        assert group is not None  # parse_shared raises for a malformed $share/ filter
        if not group:
            raise TopicError(f"shared subscription {filt!r} has an empty share name")
        if "+" in group or "#" in group:
            raise TopicError(f"shared subscription {filt!r}: share name {group!r} has a wildcard")
        if not inner:
            raise TopicError(f"shared subscription {filt!r} has an empty topic filter")
        _check_filter_levels(inner, "shared subscription filter")
    else:
        _check_filter_levels(filt, "topic filter")


def parse_shared(filt: str) -> tuple[str | None, str]:
    """``"$share/g/a/b"`` -> ``("g", "a/b")``; any other filter ``f`` -> ``(None, f)``.

    Only the exact prefix ``$share/`` makes a shared subscription (``$share`` alone or
    ``$shared/x`` are ordinary filters). Raises TopicError when a ``$share/`` filter has no
    ``/`` after the share name, since then there is no inner filter at all. An empty share name
    or inner filter is returned as is; :func:`validate_topic_filter` rejects those."""
    if not filt.startswith(SHARE_PREFIX):
        return None, filt
    slash = filt.find("/", _SHARE_LEN)
    if slash < 0:
        raise TopicError(f"shared subscription {filt!r} has no topic filter after the share name")
    return filt[_SHARE_LEN:slash], filt[slash + 1 :]


# ------------------------------------------------------------------------------------ matching


def matches(filt: str, topic: str) -> bool:
    """True when topic name ``topic`` matches filter ``filt`` (MQTT semantics, see module doc).

    Neither argument is validated (callers validate once on the way in)."""
    if filt.startswith(SHARE_PREFIX):
        filt = parse_shared(filt)[1]
    first = filt[:1]
    if first == "+" or first == "#":
        if topic[:1] == "$":
            return False  # the $ rule: server topics are not caught by a leading wildcard
    elif "+" not in filt and "#" not in filt:
        return filt == topic  # literal filter: the common cheap case
    f_levels = filt.split("/")
    t_levels = topic.split("/")
    n_topic = len(t_levels)
    for i, level in enumerate(f_levels):
        if level == "#":
            return True  # covers the parent too: "a/#" vs "a" reaches here with i == n_topic
        if i >= n_topic:
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == n_topic


def has_wildcards(filt: str) -> bool:
    """True when ``filt`` holds ``+`` or ``#``. For a valid ``$share/g/f`` this is the answer for
    ``f``, since a valid share name holds no wildcard."""
    return "+" in filt or "#" in filt


def literal_prefix(filt: str) -> str:
    """The longest string every topic matched by ``filt`` starts with, found from its literal
    levels (usable as a ZeroMQ SUB prefix).

    ``a/b/+/c`` -> ``a/b/`` (a level must follow, so its separator is certain);
    ``a/b/#`` -> ``a/b`` (``#`` also matches the parent ``a/b``, so no trailing ``/``);
    ``a/b`` -> ``a/b`` (the caller adds a terminator for exact filters); ``#``, ``+/x`` -> ``""``.
    A ``$share/g/f`` filter gives the prefix of ``f``."""
    if filt.startswith(SHARE_PREFIX):
        filt = parse_shared(filt)[1]
    plus = filt.find("+")
    hash_ = filt.find("#")
    if plus < 0 and hash_ < 0:
        return filt
    if plus >= 0 and (hash_ < 0 or plus < hash_):
        # In a valid filter '+' fills its level, so everything before it ends with '/' (or is
        # empty): exactly the literal levels plus their separator.
        return filt[:plus]
    # '#' is the last level: drop it and the separator before it, since "a/#" matches "a".
    return filt[: max(hash_ - 1, 0)]


# ------------------------------------------------------------------------ the subscription trie

T = TypeVar("T", bound=Hashable)


class _Node:
    """One level of the trie. ``children`` is keyed by the literal level text, with ``+`` and
    ``#`` stored as ordinary keys (a valid topic name never has them as a level).
    ``subs`` maps each full filter string ending here (``a/b`` and ``$share/g/a/b`` share the
    node) to its subscribers and their per-subscription value."""

    __slots__ = ("children", "subs")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.subs: dict[str, dict[Any, Any]] = {}


class SubscriptionTrie(Generic[T]):
    """Maps filters to sets of subscriber keys T (hashable). One subscriber may hold many
    filters; one filter many subscribers. Each (filter, subscriber) pair carries a value
    (granted QoS, options...) that a re-add replaces.

    Shared filters are stored under their full ``$share/...`` string but placed in the trie by
    their inner filter's levels, so :meth:`match` finds them like any filter and reports the
    full string (the caller picks one member of each group)."""

    def __init__(self) -> None:
        self._root = _Node()
        # subscriber -> {filter: value}: makes remove_subscriber O(its filters) and serves
        # filters_of without walking the trie.
        self._by_subscriber: dict[T, dict[str, Any]] = {}
        # filter -> number of subscribers, so filters() is O(distinct filters).
        self._filter_count: dict[str, int] = {}
        self._size = 0
        self.version = 0  # bumped on every change so callers can invalidate match caches

    def __len__(self) -> int:
        return self._size

    @staticmethod
    def _levels(filt: str) -> list[str]:
        return parse_shared(filt)[1].split("/")

    def add(self, filt: str, subscriber: T, value: Any = None) -> bool:
        """Subscribe ``subscriber`` to ``filt``; True if the pair is new, False if it existed
        (its value is replaced either way). Raises TopicError for an invalid filter."""
        validate_topic_filter(filt)
        node = self._root
        for level in self._levels(filt):
            child = node.children.get(level)
            if child is None:
                child = node.children[level] = _Node()
            node = child
        subscribers = node.subs.get(filt)
        if subscribers is None:
            subscribers = node.subs[filt] = {}
        new = subscriber not in subscribers
        subscribers[subscriber] = value
        self._by_subscriber.setdefault(subscriber, {})[filt] = value
        if new:
            self._filter_count[filt] = self._filter_count.get(filt, 0) + 1
            self._size += 1
        # Bumped on a re-add too: the value (e.g. granted QoS) may have changed.
        self.version += 1
        return new

    def remove(self, filt: str, subscriber: T) -> bool:
        """Unsubscribe; True if the pair existed. Nodes left empty are pruned so the trie does
        not grow with every filter ever used."""
        mine = self._by_subscriber.get(subscriber)
        if mine is None or filt not in mine:
            return False
        del mine[filt]
        if not mine:
            del self._by_subscriber[subscriber]
        self._unlink(filt, subscriber)
        self.version += 1
        return True

    def _unlink(self, filt: str, subscriber: T) -> None:
        path: list[tuple[_Node, str]] = []
        node = self._root
        for level in self._levels(filt):
            path.append((node, level))
            node = node.children[level]
        subscribers = node.subs[filt]
        del subscribers[subscriber]
        if not subscribers:
            del node.subs[filt]
        count = self._filter_count[filt] - 1
        if count:
            self._filter_count[filt] = count
        else:
            del self._filter_count[filt]
        self._size -= 1
        # Prune from the leaf up while nodes hold nothing.
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.subs or child.children:
                break
            del parent.children[level]

    def remove_subscriber(self, subscriber: T) -> int:
        """Remove every filter of ``subscriber``; return how many there were."""
        mine = self._by_subscriber.pop(subscriber, None)
        if not mine:
            return 0
        for filt in mine:
            self._unlink(filt, subscriber)
        self.version += 1
        return len(mine)

    def match(self, topic: str) -> list[tuple[T, str, Any]]:
        """Every (subscriber, filter, value) whose filter matches topic name ``topic``. A
        subscriber with two matching filters appears twice; the caller dedups per MQTT rules.
        ``topic`` is assumed valid (no wildcards)."""
        out: list[tuple[T, str, Any]] = []
        levels = topic.split("/")
        nodes = [self._root]
        # The $ rule only concerns wildcards at the first level, so it is a flag for i == 0.
        wild_ok = not topic.startswith("$")
        for level in levels:
            following: list[_Node] = []
            for node in nodes:
                children = node.children
                if not children:
                    continue
                if wild_ok:
                    rest = children.get("#")
                    if rest is not None:
                        _collect(rest, out)
                    plus = children.get("+")
                    if plus is not None:
                        following.append(plus)
                exact = children.get(level)
                # A (malformed) topic level "+" or "#" must not reach the wildcard node twice.
                if exact is not None and level != "+" and level != "#":
                    following.append(exact)
            if not following:
                return out
            nodes = following
            wild_ok = True
        for node in nodes:
            _collect(node, out)
            # "a/#" also matches "a": the parent rule.
            rest = node.children.get("#")
            if rest is not None:
                _collect(rest, out)
        return out

    def filters(self) -> set[str]:
        """The distinct filters present (full strings, ``$share/...`` included)."""
        return set(self._filter_count)

    def filters_of(self, subscriber: T) -> dict[str, Any]:
        """``{filter: value}`` for one subscriber (a copy; empty if unknown)."""
        return dict(self._by_subscriber.get(subscriber, ()))


def _collect(node: _Node, out: list[tuple[Any, str, Any]]) -> None:
    for filt, subscribers in node.subs.items():
        for subscriber, value in subscribers.items():
            out.append((subscriber, filt, value))
