"""Render retained topics as a tree with counts and sizes (what `zmesh topics` prints). Pure."""

from __future__ import annotations

from typing import Any

SIZE = "\0"  # a key no topic level can be: MQTT forbids U+0000 in topics


def render_tree(entries: list[dict[str, Any]]) -> str:
    """``entries``: ``{"topic", "bytes", ...}`` dicts. Each level shows how many retained
    topics lie below it and their payload bytes; leaves show their own size."""
    root: dict[str, Any] = {}
    for entry in entries:
        node = root
        for level in entry["topic"].split("/"):
            node = node.setdefault(level, {})
        node[SIZE] = entry["bytes"]
    total = sum(e["bytes"] for e in entries)
    lines = [f"{_count(len(entries), 'retained topic')}, {total} byte{'' if total == 1 else 's'}"]
    _render(root, "", lines)
    return "\n".join(lines)


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _totals(node: dict[str, Any]) -> tuple[int, int]:
    count = 1 if SIZE in node else 0
    size = node.get(SIZE, 0)
    for name, child in node.items():
        if name != SIZE:
            c, s = _totals(child)
            count, size = count + c, size + s
    return count, size


def _render(node: dict[str, Any], indent: str, lines: list[str]) -> None:
    children = sorted(k for k in node if k != SIZE)
    for i, name in enumerate(children):
        child = node[name]
        last = i == len(children) - 1
        count, size = _totals(child)
        shown = name if name else "(empty level)"
        detail = f"{size} B" if count == 1 and SIZE in child and len(child) == 1 else f"{_count(count, 'topic')}, {size} B"
        lines.append(f"{indent}{'└── ' if last else '├── '}{shown}  [{detail}]")
        _render(child, indent + ("    " if last else "│   "), lines)
