"""A topic tree over the retained topics: which stored topics a subscription filter matches.
Pure: no I/O.

A new wildcard subscription is answered from the retained cache. Scanning every topic and
matching the filter against each made one SUBSCRIBE cost O(retained topics), so a client
sending thousands of wildcard filters held the event loop for seconds (issue 14, hole 2).
Here the filter walks the tree level by level: a literal level follows one child, ``+``
every child of that level, ``#`` the whole subtree below. The cost is the part of the tree
the filter can match, never the topics it cannot.

Each node is a dict from level text to child node; the key ``None`` (never a level: levels
are strings) marks that a stored topic ends at this node. One dict per node keeps the tree
small: it holds only the topics of the cache, as the cache's own dict does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

_END = None  # the key that marks "a topic ends here"


class TopicIndex:
    def __init__(self) -> None:
        self._root: dict[Any, Any] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def add(self, topic: str) -> None:
        node = self._root
        for level in topic.split("/"):
            child = node.get(level)
            if child is None:
                child = node[level] = {}
            node = child
        if _END not in node:
            node[_END] = topic
            self._size += 1

    def discard(self, topic: str) -> None:
        path: list[tuple[dict[Any, Any], str]] = []
        node = self._root
        for level in topic.split("/"):
            child = node.get(level)
            if child is None:
                return
            path.append((node, level))
            node = child
        if _END not in node:
            return
        del node[_END]
        self._size -= 1
        for parent, level in reversed(path):  # prune the branch while it holds nothing
            if parent[level]:
                break
            del parent[level]

    def match(self, filt: str) -> Iterator[str]:
        """Every stored topic the (valid, non-shared) filter matches, in no set order. The
        ``$`` rule holds: ``#`` or ``+`` as the first level does not match ``$`` topics."""
        levels = filt.split("/")
        last = len(levels) - 1
        stack: list[tuple[dict[Any, Any], int]] = [(self._root, 0)]
        while stack:
            node, i = stack.pop()
            level = levels[i]
            if level == "#":
                # "a/#" matches "a" too (the parent level), and everything below.
                if i and _END in node:
                    yield node[_END]
                yield from _subtree(node, skip_dollar=i == 0)
                continue
            if level == "+":
                children = [(k, c) for k, c in node.items() if k is not _END and not (i == 0 and k.startswith("$"))]
            else:
                child = node.get(level)
                children = [(level, child)] if child is not None else []
            for _key, child in children:
                if i == last:
                    if _END in child:
                        yield child[_END]
                else:
                    stack.append((child, i + 1))


def _subtree(node: dict[Any, Any], skip_dollar: bool) -> Iterator[str]:
    """Every topic strictly below ``node`` (skipping ``$`` first levels at the root)."""
    stack = [c for k, c in node.items() if k is not _END and not (skip_dollar and k.startswith("$"))]
    while stack:
        current = stack.pop()
        for key, child in current.items():
            if key is _END:
                yield child
            else:
                stack.append(child)
