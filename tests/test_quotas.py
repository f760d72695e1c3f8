"""Tenant quotas of the gateway over real HTTP: rpm, tpm and budget each refuse with 429
and Retry-After before any upstream call (the emulator counts the calls), windows and
budget periods roll over on a controlled clock, Anthropic's error shape on
/v1/messages, the cost header and body block, /v1/router/usage and its auth, and the
config errors of quotas; and quotas through Redis with two served processes (and
Redis going away under them)."""

from __future__ import annotations

import functools
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
import trio
from genai_prices import Usage as TableUsage
from genai_prices import calc_price
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from test_gateway import Proc
from test_shared import RedisServer

from router import ConfigError, RouterConfig
from router._config import GatewayKey
from router._types import Usage
from router.emulator import Emulator, Fault
from router.gateway import _access, _quota
from router.gateway._app import usd
from router.gateway._serve import serve

ADMIN = "admin-secret-quota-0001"
KEYS = {
    "rpm": "gw-rpm-secret-0001",
    "tpm": "gw-tpm-secret-0002",
    "budget": "gw-budget-secret-0003",
    "free": "gw-free-secret-0004",
}
HELLO = [{"role": "user", "content": "hello quotas"}]


class FakeClock(_quota.QuotaClock):
    """The quotas' clock, moved by the test: `now` for the 60 s windows, `wall` for
    the UTC calendar (starts a minute before midnight)."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.wall_at = datetime(2026, 1, 5, 23, 59, tzinfo=UTC).timestamp()

    def now(self) -> float:
        return trio.current_time() + self.offset

    def wall(self) -> float:
        return self.wall_at


def config(emulator_url: str) -> RouterConfig:
    return RouterConfig.from_dict(
        {
            "router": {"transient_retries": 0, "timeout": 10.0},
            "gateway": {
                "admin_key": ADMIN,
                "shutdown_grace": 1.0,
                "access_log": "json",
                "api_keys": [
                    {"id": "rpm-key", "secret": KEYS["rpm"], "tenant": "team-r", "rpm": 2},
                    {"id": "tpm-key", "secret": KEYS["tpm"], "tenant": "team-t", "tpm": 50},
                    {
                        "id": "budget-key",
                        "secret": KEYS["budget"],
                        "tenant": "team-b",
                        "budget_usd": 0.01,
                        "budget_period": "day",
                    },
                    {"id": "free-key", "secret": KEYS["free"], "tenant": "team-f"},
                ],
            },
            "providers": [
                {
                    "name": "emu",
                    "kind": "openai",
                    "base_url": f"{emulator_url}/v1",
                    "pricing": "openai",
                    "keys": [{"id": "k1", "secret": "sk-emu-quota-k1"}],
                }
            ],
            "models": [{"name": "smart", "provider": "emu", "upstream": "gpt-4o"}],
        }
    )


@asynccontextmanager
async def rig(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[httpx.AsyncClient, Emulator, FakeClock]]:
    clock = FakeClock()
    monkeypatch.setattr(_quota, "default_clock", clock)
    async with Emulator.serve(port=0) as emu, trio.open_nursery() as nursery:
        urls = await nursery.start(functools.partial(serve, config(emu.url), port=0))
        async with httpx.AsyncClient(base_url=urls[0], timeout=10) as client:
            yield client, emu, clock
        nursery.cancel_scope.cancel()


async def chat(client: httpx.AsyncClient, who: str, **extra: Any) -> httpx.Response:
    body = {"model": "smart", "messages": HELLO, **extra}
    return await client.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEYS[who]}"}
    )


def refused(response: httpx.Response, code: str) -> int:
    """Assert an OpenAI-shaped quota 429; returns its Retry-After."""
    assert response.status_code == 429, response.text
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == code
    return int(response.headers["retry-after"])


async def test_rpm_refuses_without_an_upstream_call_until_the_window_frees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig(monkeypatch) as (client, emu, clock):
        assert [(await chat(client, "rpm")).status_code for _ in range(2)] == [200, 200]
        over = await chat(client, "rpm")
        retry = refused(over, "rpm_quota_exceeded")
        assert 55 <= retry <= 60
        assert "rpm-key" in over.json()["error"]["message"]
        assert KEYS["rpm"] not in over.text
        assert len(emu.calls) == 2
        assert (await chat(client, "free")).status_code == 200  # other keys unaffected
        clock.offset += 60.0  # the window slides past both requests
        assert (await chat(client, "rpm")).status_code == 200
        assert len(emu.calls) == 4


async def test_tpm_counts_the_estimate_then_the_reported_usage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig(monkeypatch) as (client, emu, clock):
        emu.script(Fault(usage=Usage(prompt_tokens=30, completion_tokens=30)))
        assert (await chat(client, "tpm")).status_code == 200  # ~10 estimated, 60 reported
        retry = refused(await chat(client, "tpm"), "tpm_quota_exceeded")
        assert 55 <= retry <= 60
        assert len(emu.calls) == 1
        clock.offset += 61.0
        assert (await chat(client, "tpm")).status_code == 200


def _cost(prompt: int, completion: int) -> float:
    usage = TableUsage(input_tokens=prompt, output_tokens=completion)
    return float(calc_price(usage, "gpt-4o", provider_id="openai").total_price)


async def test_budget_refuses_until_the_utc_day_ends(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.access")
    async with rig(monkeypatch) as (client, emu, clock):
        emu.script(Fault(usage=Usage(prompt_tokens=5000, completion_tokens=1000)))
        first = await chat(client, "budget")
        assert first.status_code == 200
        cost = _cost(5000, 1000)
        assert cost > 0.01
        assert first.headers["x-router-cost-usd"] == usd(cost)
        assert first.json()["x_router"]["cost_usd"] == pytest.approx(cost)
        over = await chat(client, "budget")
        assert refused(over, "budget_quota_exceeded") == 60  # 23:59 -> midnight UTC
        assert "budget" in over.json()["error"]["message"]
        assert len(emu.calls) == 1
        clock.wall_at += 61.0  # a new UTC day: a new budget
        assert (await chat(client, "budget")).status_code == 200
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "router.access"]
    assert [line["status"] for line in lines if line["tenant"] == "team-b"] == [200, 429, 200]
    assert lines[0]["cost_usd"] == pytest.approx(cost)
    assert lines[1]["error"] == "budget_quota_exceeded" and lines[1]["model_asked"] == "smart"


async def test_a_stream_reports_its_cost_in_the_usage_chunk(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig(monkeypatch) as (client, emu, _clock):
        emu.script(Fault(usage=Usage(prompt_tokens=100, completion_tokens=10)))
        body = {
            "model": "smart",
            "messages": HELLO,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        auth = {"authorization": f"Bearer {KEYS['free']}"}
        response = await client.post("/v1/chat/completions", json=body, headers=auth)
        events = [
            json.loads(line[6:])
            for line in response.text.splitlines()
            if line.startswith("data: {")
        ]
        assert events[-1]["usage"]["prompt_tokens"] == 100
        assert events[-1]["x_router"]["cost_usd"] == pytest.approx(_cost(100, 10))


async def test_anthropic_clients_get_anthropics_429(monkeypatch: pytest.MonkeyPatch) -> None:
    async with rig(monkeypatch) as (client, emu, _clock):
        body = {"model": "smart", "max_tokens": 20, "messages": HELLO}
        headers = {"x-api-key": KEYS["rpm"], "anthropic-version": "2023-06-01"}
        statuses = []
        for _ in range(3):
            response = await client.post("/v1/messages", json=body, headers=headers)
            statuses.append(response.status_code)
        assert statuses == [200, 200, 429]
        assert response.json()["type"] == "error"
        assert response.json()["error"]["type"] == "rate_limit_error"
        assert 1 <= int(response.headers["retry-after"]) <= 60
        assert len(emu.calls) == 2


async def test_usage_endpoint_needs_the_admin_key_and_sums_per_tenant_and_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with rig(monkeypatch) as (client, emu, _clock):
        emu.script(
            [
                Fault(usage=Usage(prompt_tokens=400, completion_tokens=40)),
                Fault(usage=Usage(prompt_tokens=100, completion_tokens=10)),
                Fault(usage=Usage(prompt_tokens=1000, completion_tokens=100)),
            ]
        )
        for who in ("budget", "budget", "free"):
            assert (await chat(client, who)).status_code == 200
        assert (await client.get("/v1/router/usage")).status_code == 401
        tenant_auth = {"authorization": f"Bearer {KEYS['free']}"}
        assert (await client.get("/v1/router/usage", headers=tenant_auth)).status_code == 401
        admin = {"authorization": f"Bearer {ADMIN}"}
        response = await client.get("/v1/router/usage", headers=admin)
        assert response.status_code == 200
        report = response.json()
        assert report["source"] == "local" and report["since"]
        tenants = {t["tenant"]: t for t in report["tenants"]}
        b = tenants["team-b"]
        assert (b["requests"], b["input_tokens"], b["output_tokens"]) == (2, 500, 50)
        assert b["cost_usd"] == pytest.approx(_cost(500, 50))
        assert b["models"]["smart"]["requests"] == 2
        assert tenants["team-f"]["input_tokens"] == 1000
        assert report["models"]["smart"]["requests"] == 3
        quotas = {q["key_id"]: q for q in report["quotas"]}
        assert quotas["budget-key"]["spent_usd"] == pytest.approx(_cost(500, 50))
        assert quotas["rpm-key"]["rpm"] == 2 and quotas["rpm-key"]["spent_usd"] is None
        assert "free-key" not in quotas
        for secret in (*KEYS.values(), ADMIN, "sk-emu-quota-k1"):
            assert secret not in response.text


async def test_quota_refusals_are_counted_in_the_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    async with rig(monkeypatch) as (client, _emu, _clock):
        for _ in range(3):
            await chat(client, "rpm")
        text = (await client.get("/metrics")).text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    key = ("llm_router_quota_rejected_total", (("gateway_key", "rpm-key"), ("limit", "rpm")))
    assert samples[key] == 1.0
    tokens = [
        v
        for (name, labels), v in samples.items()
        if name == "llm_router_tenant_tokens_total" and ("tenant", "team-r") in labels
    ]
    assert tokens and max(tokens) > 0


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"rpm": 0}, "gateway.api_keys[0].rpm"),
        ({"tpm": -5}, "gateway.api_keys[0].tpm"),
        ({"budget_usd": 0}, "gateway.api_keys[0].budget_usd"),
        ({"budget_usd": 5, "budget_period": "week"}, "gateway.api_keys[0].budget_period"),
        ({"rpm": "ten"}, "gateway.api_keys[0].rpm"),
    ],
)
def test_bad_quota_values_name_the_field(patch: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_dict(
            {
                "providers": [{"name": "p", "kind": "custom", "keys": [{"id": "k"}]}],
                "gateway": {"api_keys": [{"id": "a", "secret": "s", **patch}]},
            }
        )
    assert info.value.field == field


@pytest.mark.parametrize(
    ("at", "kind", "period", "end"),
    [
        ("2026-01-05T10:00:00", "day", "2026-01-05", "2026-01-06T00:00:00"),
        ("2026-01-31T23:59:59", "month", "2026-01", "2026-02-01T00:00:00"),
        ("2026-12-15T00:00:00", "month", "2026-12", "2027-01-01T00:00:00"),
    ],
)
def test_budget_periods_are_utc_calendar_periods(at: str, kind: str, period: str, end: str) -> None:
    wall = datetime.fromisoformat(at).replace(tzinfo=UTC).timestamp()
    got, until = _quota.period_of(wall, kind)
    assert got == period
    assert until == datetime.fromisoformat(end).replace(tzinfo=UTC).timestamp()


# -- through Redis: two served processes enforce one limit ------------------------------


SHARED_KEYS = {"rpm": "gw-shared-rpm-0005", "budget": "gw-shared-budget-0006"}


def _shared_config(emulator_url: str, redis_port: int, prefix: str) -> str:
    return f"""
[router]
timeout = 5.0
transient_retries = 0

[router.shared]
redis_url = "redis://127.0.0.1:{redis_port}/0"
key_prefix = "{prefix}"
timeout = 0.3
budget_timeout = 0.5
ping_interval = 0.1

[gateway]
admin_key = "{ADMIN}"
shutdown_grace = 1.0

[[gateway.api_keys]]
id = "rpm-key"
secret = "{SHARED_KEYS["rpm"]}"
tenant = "team-r"
rpm = 3

[[gateway.api_keys]]
id = "budget-key"
secret = "{SHARED_KEYS["budget"]}"
tenant = "team-b"
budget_usd = 0.01
budget_period = "month"

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
pricing = "openai"
keys = [{{ id = "k1", secret = "sk-emu-shared-quota" }}]

[[models]]
name = "smart"
provider = "emu"
upstream = "gpt-4o"
"""


@pytest.fixture(scope="module")
def pair(
    emulator: Proc, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Proc]]:
    """Two `llm-router serve` processes sharing one redis-server."""
    path = tmp_path_factory.mktemp("quota-shared") / "router.toml"
    path.write_text(_shared_config(emulator.url, redis.port, f"q-{uuid.uuid4().hex[:8]}"))
    procs: list[Proc] = []
    try:
        for _ in range(2):
            args = ["-m", "router", "serve", "--config", str(path), "--port", "0"]
            procs.append(Proc([*args, "--access-log", "off"], "listening on"))
        _wait_shared(procs)
        yield procs
    finally:
        for proc in procs:
            proc.kill()
            log = proc.stderr()
            assert "Traceback" not in log, log[-3000:]
            for secret in (*SHARED_KEYS.values(), ADMIN):
                assert secret not in log


def _wait_shared(procs: list[Proc]) -> None:
    admin = {"authorization": f"Bearer {ADMIN}"}
    deadline = time.monotonic() + 10
    for proc in procs:
        while True:
            state = httpx.get(f"{proc.url}/v1/router/state", headers=admin, timeout=5).json()
            if state["shared"]["reachable"]:
                break
            assert time.monotonic() < deadline, "Redis never became reachable"
            time.sleep(0.05)


def _post(proc: Proc, who: str) -> httpx.Response:
    return httpx.post(
        f"{proc.url}/v1/chat/completions",
        json={"model": "smart", "messages": HELLO},
        headers={"authorization": f"Bearer {SHARED_KEYS[who]}"},
        timeout=10,
    )


def _upstream_calls(emulator: Proc) -> int:
    return len(httpx.get(f"{emulator.url}/_emulator/calls", timeout=5).json())


def _usage(proc: Proc) -> dict[str, Any]:
    admin = {"authorization": f"Bearer {ADMIN}"}
    response = httpx.get(f"{proc.url}/v1/router/usage", headers=admin, timeout=5)
    assert response.status_code == 200
    result: dict[str, Any] = response.json()
    return result


def test_two_processes_enforce_one_rpm_and_one_budget_through_redis(
    pair: list[Proc], emulator: Proc
) -> None:
    httpx.post(f"{emulator.url}/_emulator/reset", timeout=5).raise_for_status()
    statuses = [_post(pair[i % 2], "rpm").status_code for i in range(4)]
    assert statuses == [200, 200, 200, 429]
    over = _post(pair[0], "rpm")
    assert over.status_code == 429 and int(over.headers["retry-after"]) >= 50
    assert _upstream_calls(emulator) == 3

    fault = {"faults": [{"usage": {"prompt_tokens": 5000, "completion_tokens": 1000}}]}
    httpx.post(f"{emulator.url}/_emulator/script", json=fault, timeout=5)
    assert _post(pair[0], "budget").status_code == 200
    deadline = time.monotonic() + 5
    while True:  # the spend is charged off the request path: wait until Redis has it
        spent = {q["key_id"]: q["spent_usd"] for q in _usage(pair[1])["quotas"]}
        if spent["budget-key"] > 0.01:
            break
        assert time.monotonic() < deadline, spent
        time.sleep(0.05)
    refused_elsewhere = _post(pair[1], "budget")
    assert refused_elsewhere.status_code == 429
    assert refused_elsewhere.json()["error"]["code"] == "budget_quota_exceeded"
    assert _upstream_calls(emulator) == 4

    deadline = time.monotonic() + 5
    while True:  # each instance adds its totals to Redis about once a second
        report = _usage(pair[1])
        assert report["source"] == "shared"
        tenants = {t["tenant"]: t for t in report["tenants"]}
        # team-r was served by both processes, team-b by one: each total is in Redis
        # once its instance has flushed (about once a second, independently)
        if tenants.get("team-r", {}).get("requests") == 3 and "team-b" in tenants:
            break
        assert time.monotonic() < deadline, report
        time.sleep(0.1)
    assert tenants["team-b"]["cost_usd"] == pytest.approx(_cost(5000, 1000))


def test_with_redis_down_quotas_are_counted_locally_and_say_so(
    pair: list[Proc], redis: RedisServer, emulator: Proc
) -> None:
    redis.stop()
    try:
        time.sleep(0.5)  # both notice (ping_interval + timeout)
        response = _post(pair[0], "budget")
        # this process's own count of the budget key's spend decides: it spent it above
        assert response.status_code == 429
        assert _post(pair[1], "rpm").status_code in (200, 429)
        metrics = httpx.get(f"{pair[0].url}/metrics", timeout=5).text
        [local] = [
            s.value
            for family in text_string_to_metric_families(metrics)
            for s in family.samples
            if s.name == "llm_router_quota_local_decisions_total"
        ]
        assert local >= 1
        assert "tenant quotas are counted locally" in pair[0].stderr()
        assert _usage(pair[0])["source"] == "local"
    finally:
        redis.start()


@given(
    st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False),
    st.sampled_from(["day", "month"]),
)
def test_a_period_holds_its_time_and_the_next_starts_at_its_end(wall: float, kind: str) -> None:
    period, end = _quota.period_of(wall, kind)
    assert wall < end <= wall + 31 * 86_400
    following, later = _quota.period_of(end, kind)
    assert following > period and later > end
    assert _quota.period_of(end - 1e-3, kind)[0] == period


def test_the_text_access_line_has_the_cost() -> None:
    entry = _access.Access("req-1", "POST", "/v1/chat/completions", 0.0)
    entry.cost = 0.0225
    assert "cost_usd=0.0225" in _access.line(entry, 200, 0.01, "text")
    entry.cost = None
    assert "cost_usd" not in _access.line(entry, 200, 0.01, "text")


async def test_a_reload_keeps_the_counts_of_keys_whose_limits_did_not_change() -> None:
    def keys(rpm: int, tenant: str) -> list[GatewayKey]:
        return [
            GatewayKey(id="a", secret="gw-a-secret-0001", tenant=tenant, rpm=rpm),
            GatewayKey(id="b", secret="gw-b-secret-0002", rpm=1),
        ]

    quotas = _quota.TenantQuotas(keys(2, "team-a"), FakeClock())
    assert isinstance(await quotas.admit("a", 1), _quota.Ticket)
    assert isinstance(await quotas.admit("a", 1), _quota.Ticket)
    assert isinstance(await quotas.admit("a", 1), _quota.Refusal)
    quotas.reconfigure(keys(2, "team-x"))  # same limits (a new tenant name): counts kept
    assert isinstance(await quotas.admit("a", 1), _quota.Refusal)
    quotas.reconfigure(keys(3, "team-x"))  # a new limit starts afresh
    assert isinstance(await quotas.admit("a", 1), _quota.Ticket)
    quotas.reconfigure(keys(3, "team-x")[1:])  # key a removed: no quota any more
    assert await quotas.admit("a", 1) is None
