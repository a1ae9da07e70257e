"""Mesh policy: which peer node may publish to which topics. Pure: no I/O.

CURVE proves *which key* a peer holds; the trusted-key directory names that key (the
certificate's file name, ``scanner-1.key`` -> ``scanner-1``). The policy maps those names
(shell-style globs, or ``key:<z85>`` for one exact key) to the topic filters the peer may
publish to::

    [mesh.policy]
    "scanner-*" = ["scans/#", "$jobs/#"]
    "ci"        = ["ci/#", "scans/requests/#"]
    "group:scanner" = ["scans/#"]        # with a mesh authority: any node whose certificate
                                         # puts it in group scanner, pods not yet born included

Rules are tried in order; the first whose pattern matches the peer decides. A peer that no
rule matches may publish anything (a policy restricts the peers it names; add ``"*" = []``
last to deny everyone unnamed). The name used is the one from our own trusted-key
directory, never the name a peer claims in its hello, so a compromised node cannot pose as
an unrestricted one.

The receiving node enforces it, on everything that arrives from that peer: live events,
retained updates and retained anti-entropy answers (a restricted peer cannot smuggle
``alerts/x`` in as a "copy" of someone else's entry; entries it may not publish are taken
only from the peers that may). Denied messages are dropped and counted.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from zmesh import topics

KEY_PREFIX = "key:"
GROUP_PREFIX = "group:"
_CACHE_LIMIT = 4096


class PolicyError(ValueError):
    pass


def validate_rules(rules: Iterable[tuple[str, Sequence[str]]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Check patterns and filters; returns the rules as tuples. Raises PolicyError."""
    checked: list[tuple[str, tuple[str, ...]]] = []
    for pattern, filters in rules:
        if not isinstance(pattern, str) or not pattern:
            raise PolicyError("a peer pattern must be a non-empty string")
        if isinstance(filters, str) or not isinstance(filters, Sequence):
            raise PolicyError(f"{pattern!r}: expected an array of topic filters")
        for filt in filters:
            if not isinstance(filt, str):
                raise PolicyError(f"{pattern!r}: expected topic filter strings, got {type(filt).__name__}")
            try:
                topics.validate_topic_filter(filt)
            except topics.TopicError as exc:
                raise PolicyError(f"{pattern!r}: {filt!r}: {exc}") from None
            if topics.parse_shared(filt)[0] is not None:
                raise PolicyError(f"{pattern!r}: {filt!r}: a shared subscription is not a publish filter")
        checked.append((pattern, tuple(filters)))
    return tuple(checked)


class TopicGate:
    """What one peer may publish: ``allows(topic)``, cached per topic."""

    __slots__ = ("filters", "_cache")

    def __init__(self, filters: tuple[str, ...]) -> None:
        self.filters = filters
        self._cache: dict[str, bool] = {}

    def allows(self, topic: str) -> bool:
        allowed = self._cache.get(topic)
        if allowed is None:
            allowed = any(topics.matches(filt, topic) for filt in self.filters)
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[topic] = allowed
        return allowed


class MeshPolicy:
    def __init__(self, rules: Iterable[tuple[str, Sequence[str]]] = ()) -> None:
        self.rules = validate_rules(rules)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def rule_for(self, name: str | None, key: str, groups: tuple[str, ...] = ()) -> tuple[str, tuple[str, ...]] | None:
        """The first rule naming this peer (by trusted name, key, or a group its verified
        certificate puts it in), or None."""
        for pattern, filters in self.rules:
            if pattern.startswith(KEY_PREFIX):
                if pattern[len(KEY_PREFIX):] == key:
                    return pattern, filters
            elif pattern.startswith(GROUP_PREFIX):
                if pattern[len(GROUP_PREFIX):] in groups:
                    return pattern, filters
            elif name is not None and fnmatch.fnmatchcase(name, pattern):
                return pattern, filters
        return None

    def gate_for(self, name: str | None, key: str, groups: tuple[str, ...] = ()) -> TopicGate | None:
        """None: the peer is unrestricted. Otherwise a gate over its allowed filters."""
        rule = self.rule_for(name, key, groups)
        return None if rule is None else TopicGate(rule[1])
