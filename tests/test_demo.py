"""The `llm-router demo` command: run_demo under virtual time, and the command line."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import trio
import trio.testing

from router import RouterConfig
from router.__main__ import main
from router._demo import MODELS, DemoSummary, load_config, run_demo

KEYS = ("alpha/a-main", "alpha/a-flaky", "beta/b-limited", "beta/b-spare", "gamma/g-main")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_embedded_config_is_the_showcase() -> None:
    config = load_config(None)
    assert isinstance(config, RouterConfig)
    names = {f"{p.name}/{k.id}" for p in config.providers for k in p.keys}
    assert names == set(KEYS)
    assert {m.name for m in config.models} >= set(MODELS)
    assert all(p.kind == "simulated" for p in config.providers)
    assert all(not k.secret for p in config.providers for k in p.keys)
    assert config.router.seed is not None


async def test_demo_accounts_for_every_request(autojump_clock: trio.testing.MockClock) -> None:
    out = io.StringIO()
    requests = 1500
    summary = await run_demo(
        load_config(None), requests=requests, concurrency=100, live=True, out=out
    )
    assert isinstance(summary, DemoSummary)

    # Each request ended in exactly one outcome.
    assert summary.requests == requests
    assert summary.successes + sum(summary.errors_by_kind.values()) == requests
    assert sum(summary.served_by_model.values()) == summary.successes
    assert sum(summary.served_by_key.values()) == summary.successes
    assert summary.successes > 0.9 * requests

    # gamma is down: it serves nothing, a breaker of its key opened (the key's own or its
    # lane for gamma-turbo, whichever the outage is charged to), and "fast" was served by
    # its fallbacks.
    assert "fast" not in summary.served_by_model
    assert summary.served_by_key.get("gamma/g-main", 0) == 0
    assert summary.opens_by_key["gamma/g-main"] >= 1
    assert summary.failovers > 0
    assert summary.fallback_served > 0
    assert summary.failovers >= summary.fallback_served
    # a-flaky's transient failures were retried in place or failed over, and it still served.
    gamma = next(k for k in summary.keys if k.key_id == "g-main")
    assert gamma.failures == gamma.requests > 0
    flaky = next(k for k in summary.keys if k.key_id == "a-flaky")
    assert flaky.failures > 0
    assert summary.served_by_key["alpha/a-flaky"] > 0

    # b-limited's 429s cooled its lane for beta-mini (not the key itself), and the
    # progress lines showed that lane cooling and gamma's breaker open.
    assert summary.cooldowns_by_key["beta/b-limited"] >= 1
    assert "alpha/a-main" not in summary.cooldowns_by_key
    limited = next(k for k in summary.keys if k.key_id == "b-limited")
    assert limited.cooling_reason is None
    assert [lane.model for lane in limited.lanes] == ["beta-mini"]
    assert summary.opens_by_key["gamma/g-main"] == gamma.opens + sum(
        lane.opens for lane in gamma.lanes
    )
    text = out.getvalue()
    progress = [line for line in text.splitlines() if line.startswith("[")]
    assert progress, text
    assert any(
        re.search(r"cooling: [^|]*beta/b-limited [\d.]+s rate_limit \(beta-mini\)", line)
        for line in progress
    )
    assert any(re.search(r"breaker: [^|]*gamma/g-main open [\d.]+s", line) for line in progress)
    assert "\x1b[" not in text  # not a terminal: no ANSI redraws

    # The summary names every key and the latency percentiles.
    assert 0 < summary.p50 <= summary.p99 <= summary.wall_time
    for key in KEYS:
        assert key in text
    assert re.search(r"gamma/g-main +0 +\d+ +\d+ +0 +[1-9]\d*  ", text)  # served 0, opened
    assert re.search(r"p50 [\d.]+ m?s, p99 [\d.]+ m?s", text)
    assert f"{requests} requests" in text
    assert f"successes   {summary.successes}" in text


async def test_demo_redraws_a_table_on_a_terminal(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = _Terminal()
    summary = await run_demo(load_config(None), requests=300, concurrency=30, live=True, out=out)
    assert summary.successes + summary.errors == 300
    text = out.getvalue()
    redraws = text.count("\x1b[J")
    # One drawing every 0.25 s of virtual time, each after the first moving back up.
    assert redraws >= 2
    assert redraws >= int(summary.wall_time / 0.25) - 1
    for column in ("breaker", "cooling", "in_flight", "queued", "requests", "failures", "opens"):
        assert column in text
    for model in MODELS:
        assert model in text
    assert "g-main" in text and "open" in text
    assert "rate_limit (beta-mini)" in text  # b-limited's key is fine; its lane cools


async def test_demo_without_live_prints_only_the_summary(
    autojump_clock: trio.testing.MockClock,
) -> None:
    out = _Terminal()
    summary = await run_demo(load_config(None), requests=60, concurrency=7, live=False, out=out)
    assert summary.successes + summary.errors == 60
    text = out.getvalue()
    assert "\x1b[" not in text
    assert not [line for line in text.splitlines() if line.startswith("[")]
    assert "60 requests" in text


def test_cli_bad_config_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(
        '[router]\ntimeout = -1\n\n[[providers]]\nname = "p"\nkind = "simulated"\n'
        '[[providers.keys]]\nid = "k"\n'
    )
    status = main(["demo", "--requests", "50", "--no-live", "--config", str(bad)])
    assert status == 2
    captured = capsys.readouterr()
    assert "router.timeout" in captured.err
    assert "requests" not in captured.out  # the demo never ran


def test_cli_missing_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(["demo", "--no-live", "--config", str(tmp_path / "nope.toml")])
    assert status == 2
    assert "nope.toml" in capsys.readouterr().err


def test_cli_rejects_a_non_positive_count(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--requests", "0"])
    assert info.value.code == 2
    assert "--requests" in capsys.readouterr().err


def test_python_m_router_demo_runs_in_real_time() -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "router",
            "demo",
            "--no-live",
            "--requests",
            "200",
            "--concurrency",
            "50",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "200 requests" in proc.stdout
    assert re.search(r"successes   \d+", proc.stdout)
    for key in KEYS:
        assert key in proc.stdout


NO_FALLBACK = """
[router]
seed = 3
transient_retries = 0

[[models]]
name = "fast"
provider = "down"
upstream = "x"

[[models]]
name = "smart"
provider = "up"
upstream = "y"

[[models]]
name = "cheap"
provider = "up"
upstream = "z"

[[providers]]
name = "down"
kind = "simulated"
simulate = { down = true }
[[providers.keys]]
id = "d1"

[[providers]]
name = "up"
kind = "simulated"
simulate = { latency = 0.05 }
[[providers.keys]]
id = "u1"
"""


async def test_demo_counts_errors_once_each(autojump_clock: trio.testing.MockClock) -> None:
    # "fast" has no fallback and its provider is down: every third request fails.
    config = RouterConfig.from_toml(NO_FALLBACK)
    out = io.StringIO()
    summary = await run_demo(config, requests=90, concurrency=9, live=False, out=out)
    assert summary.errors == 30
    assert summary.successes == 60
    assert set(summary.errors_by_kind) <= {"transient", "rate_limit", "unknown"}
    assert summary.served_by_model == {"smart": 30, "cheap": 30}
    assert summary.served_by_key == {"up/u1": 60}
    assert summary.failovers == 0
    assert summary.cooldowns_by_key == {}
    assert "errors      30 (" in out.getvalue()


async def test_http_demo_serves_every_request_over_the_emulator() -> None:
    """`--http`: the same demo with OpenAI, Anthropic and Gemini providers served over
    real loopback HTTP by the emulator (real time, a small burst)."""
    from router._demo import load_config, run_http_demo

    out = io.StringIO()
    summary = await run_http_demo(
        load_config(None), requests=120, concurrency=30, live=False, out=out
    )
    assert summary.successes + sum(summary.errors_by_kind.values()) == 120
    assert summary.successes >= 110
    assert summary.failovers > 0
    # gamma points at a refused port: it never serves and its breaker opened.
    assert summary.served_by_key.get("gamma/g-main", 0) == 0
    assert summary.opens_by_key["gamma/g-main"] >= 1
    assert "emulator at http://127.0.0.1:" in out.getvalue()
