"""`tune_gc`: the garbage collector set for many open streams, and `llm-router serve`
applying ``[gateway] gc_threshold`` at startup."""

from __future__ import annotations

import gc
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

import router
from router import tune_gc
from router.__main__ import _parser
from router.gateway import _serve


@pytest.fixture
def restored_gc() -> Iterator[None]:
    before = gc.get_threshold()
    try:
        yield
    finally:
        gc.set_threshold(*before)
        gc.unfreeze()


def test_tune_gc_raises_the_first_threshold_and_freezes(restored_gc: None) -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    previous = tune_gc(12_345)
    assert previous == before
    assert gc.get_threshold() == (12_345, before[1], before[2])
    assert gc.get_freeze_count() > 1000  # modules, this test's objects, ...


def test_tune_gc_without_freezing(restored_gc: None) -> None:
    gc.unfreeze()
    tune_gc(router._gc.GC_THRESHOLD, freeze=False)
    assert gc.get_threshold()[0] == router._gc.GC_THRESHOLD
    assert gc.get_freeze_count() == 0


def test_tune_gc_refuses_a_threshold_below_one(restored_gc: None) -> None:
    before = gc.get_threshold()
    with pytest.raises(ValueError, match="at least 1"):
        tune_gc(0)
    assert gc.get_threshold() == before


@pytest.fixture
def startup_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """`serve_command` up to the point where it would serve, with nothing left behind in
    this process (logging, signals), recording what it passes to `tune_gc`."""
    calls: list[int] = []
    monkeypatch.setattr(_serve, "tune_gc", lambda threshold: calls.append(threshold))
    monkeypatch.setattr(_serve.trio, "run", lambda *a: None)
    monkeypatch.setattr(_serve.logging, "basicConfig", lambda **kw: None)
    monkeypatch.setattr(_serve.signal, "signal", lambda *a: None)
    monkeypatch.setattr(_serve, "_setup_access_log", lambda fmt: None)
    loggers = [logging.getLogger(name) for name in ("httpx", "httpcore")]
    levels = [logger.level for logger in loggers]
    yield calls
    for logger, level in zip(loggers, levels, strict=True):  # it quiets them; others read them
        logger.setLevel(level)


@pytest.mark.parametrize(("setting", "expected"), [("", 10_000), ("gc_threshold = 2500", 2500)])
def test_serve_tunes_the_gc_from_the_config(
    tmp_path: Path, startup_only: list[int], setting: str, expected: int
) -> None:
    cfg = tmp_path / "router.toml"
    cfg.write_text(_config(setting))
    args = _parser().parse_args(["serve", "--config", str(cfg)])
    assert _serve.serve_command(args) == 0
    assert startup_only == [expected]


def test_serve_leaves_the_gc_alone_when_told(tmp_path: Path, startup_only: list[int]) -> None:
    cfg = tmp_path / "router.json"
    cfg.write_text(
        '{"providers": [{"name": "sim", "kind": "simulated", "keys": [{"id": "k"}]}],'
        ' "models": [{"name": "m", "provider": "sim", "upstream": "u"}],'
        ' "gateway": {"gc_threshold": null}}'
    )
    args = _parser().parse_args(["serve", "--config", str(cfg)])
    assert _serve.serve_command(args) == 0
    assert startup_only == []


def _config(gateway_line: str) -> str:
    return f"""
[[providers]]
name = "sim"
kind = "simulated"
keys = [{{ id = "k" }}]
[[models]]
name = "m"
provider = "sim"
upstream = "u"
[gateway]
{gateway_line}
"""
