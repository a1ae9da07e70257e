from zmesh.retained.topictree import render_tree


def test_tree_counts_and_sizes() -> None:
    text = render_tree([
        {"topic": "a/b", "bytes": 3}, {"topic": "a/c", "bytes": 4}, {"topic": "x", "bytes": 1},
        {"topic": "a//d", "bytes": 2},
    ])
    lines = text.splitlines()
    assert lines[0] == "4 retained topics, 10 bytes"
    assert "a  [3 topics, 9 B]" in lines[1]
    assert any("(empty level)" in line for line in lines)
    assert lines[-1].endswith("x  [1 B]")


def test_one_topic_is_singular() -> None:
    from zmesh.retained.topictree import render_tree

    lines = render_tree([{"topic": "a/b", "bytes": 1}, {"topic": "c/d", "bytes": 0}]).splitlines()
    assert lines[0] == "2 retained topics, 1 byte"
    assert "a  [1 topic, 1 B]" in lines[1], lines
    assert render_tree([{"topic": "x", "bytes": 2}]).splitlines()[0] == "1 retained topic, 2 bytes"
