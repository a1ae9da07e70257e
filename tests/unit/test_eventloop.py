"""zmesh.eventloop: which loop a node runs on, and the switch that overrides it."""

from __future__ import annotations

import asyncio

import pytest

from zmesh import eventloop


async def _loop_module() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def test_asyncio_forced_runs_the_standard_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "asyncio")
    assert eventloop.describe() == "asyncio"
    assert eventloop.run(_loop_module()) == "asyncio"


def test_auto_prefers_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop", reason="uvloop is not installed on this platform")
    monkeypatch.delenv(eventloop.ENV, raising=False)
    assert eventloop.describe() == f"uvloop {uvloop.__version__}"
    assert eventloop.run(_loop_module()) == "uvloop"


def test_an_unknown_choice_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    with pytest.raises(ValueError, match="ZMESH_EVENT_LOOP='trio'"):
        eventloop.describe()


def test_an_unknown_choice_refuses_to_run_and_leaves_no_unawaited_coroutine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(eventloop.ENV, "trio")
    main = _loop_module()
    with pytest.raises(ValueError):
        eventloop.run(main)
    assert main.cr_frame is None  # closed, not left pending
