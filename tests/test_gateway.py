"""The HTTP gateway end to end: a real `llm-router serve` process on loopback, with the
provider emulator (`python -m router.emulator`) in another process behind it, called by
the official `openai` SDK and by plain httpx.

Real time and real sockets throughout, so every timeout is short. Every subprocess is
killed in fixture teardown, whatever the test did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

GW_KEY = "gw-secret-alice-0001"
GW_KEY_BOB = "gw-secret-bob-0002"
ADMIN_KEY = "gw-admin-secret-0003"
UP_K1 = "sk-emu-key-one-111"
UP_K2 = "sk-emu-key-two-222"
SECRETS = (GW_KEY, GW_KEY_BOB, ADMIN_KEY, UP_K1, UP_K2)
MAX_BODY = 8192


def _config(emulator_url: str, grace: float = 10.0) -> str:
    return f"""
[router]
timeout = 5.0
attempt_timeout = 2.0
first_token_timeout = 2.0
idle_timeout = 2.0
transient_retries = 1
retry_backoff = [0.01]
retry_jitter = 0.0
seed = 3
per_tenant_breakers = true
max_continuations = 0  # interruptions as such (tests/test_gateway_fidelity.py continues)

[router.breaker]
failure_threshold = 1000
minimum_calls = 1000
window = 1000

[gateway]
admin_key = "{ADMIN_KEY}"
max_body_bytes = {MAX_BODY}
shutdown_grace = {grace}
api_keys = [
    {{ id = "alice", secret = "{GW_KEY}", tenant = "team-a" }},
    {{ id = "bob", secret = "env:TEST_GW_BOB_KEY" }},
]

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k1", secret = "{UP_K1}" }}, {{ id = "k2", secret = "env:TEST_EMU_K2" }}]

[[models]]
name = "smart"
provider = "emu"
upstream = "gpt-main"
fallbacks = ["emu/gpt-backup"]
"""


class Proc:
    """A subprocess whose first stdout line carrying a URL is its address."""

    def __init__(self, args: list[str], marker: str, env: dict[str, str] | None = None) -> None:
        self.stderr_path = (
            Path(os.environ.get("TMPDIR", "/tmp")) / f"gw-test-{os.getpid()}-{id(self)}.err"
        )
        self._stderr = self.stderr_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, **(env or {})},
            text=True,
        )
        self.url = self._wait_for(marker)

    def _wait_for(self, marker: str) -> str:
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if marker in line and "http://" in line:
                    found.append(line[line.index("http://") :].strip())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=10)
        if not found:
            self.kill()
            raise RuntimeError(f"process did not start: {self.stderr()}")
        return found[0]

    def stderr(self) -> str:
        if not self._stderr.closed:
            self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(timeout=5)
        finally:
            self._stderr.close()
            if self.proc.stdout is not None:
                self.proc.stdout.close()


def _start_gateway(tmp: Path, emulator_url: str, grace: float = 10.0) -> Proc:
    config = tmp / "router.toml"
    config.write_text(_config(emulator_url, grace))
    return Proc(
        ["-m", "router", "serve", "--config", str(config), "--port", "0"],
        "listening on",
        env={"TEST_GW_BOB_KEY": GW_KEY_BOB, "TEST_EMU_K2": UP_K2},
    )


@pytest.fixture(scope="module")
def gateway(emulator: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = _start_gateway(tmp_path_factory.mktemp("gw"), emulator.url)
    try:
        yield proc
    finally:
        proc.kill()
        log = proc.stderr()
        for secret in SECRETS:
            assert secret not in log, "a secret reached the gateway's log"


@pytest.fixture
def http(gateway: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {GW_KEY}"}, timeout=10
    ) as client:
        yield client


@pytest.fixture
def emu(emulator: Proc, gateway: Proc) -> Iterator[httpx.Client]:
    """The emulator's admin API; every test starts and ends with a clean script and
    with the router's keys and models reset."""
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=emulator.url, timeout=5) as client:
        client.post("/_emulator/reset").raise_for_status()
        httpx.post(f"{gateway.url}/v1/router/reset", headers=admin, timeout=5).raise_for_status()
        yield client
        client.post("/_emulator/reset").raise_for_status()
        httpx.post(f"{gateway.url}/v1/router/reset", headers=admin, timeout=5).raise_for_status()


def script(
    emu: httpx.Client,
    faults: list[dict[str, Any]],
    key: str | None = None,
    model: str | None = None,
) -> None:
    body = {"key": key, "model": model, "faults": faults}
    emu.post("/_emulator/script", json=body).raise_for_status()


def sdk(gateway: Proc, key: str = GW_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=10)


HELLO = [{"role": "user", "content": "hello gateway"}]


def router_headers(headers: httpx.Headers) -> dict[str, str]:
    return {k: headers[k] for k in headers if k.startswith("x-router-")}


def assert_good(http: httpx.Client) -> None:
    """The gateway still serves an ordinary request."""
    r = http.post("/v1/chat/completions", json={"model": "smart", "messages": HELLO})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hello gateway"


# --------------------------------------------------------------------------- the openai SDK


def test_sdk_plain_completion(gateway: Proc, emu: httpx.Client) -> None:
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(
        model="smart", messages=[{"role": "user", "content": "hi there"}], max_tokens=50
    )
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hi there"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "smart"
    assert completion.usage is not None and completion.usage.total_tokens > 0
    headers = router_headers(raw.headers)
    assert headers["x-router-model"] == "smart"
    assert headers["x-router-provider"] == "emu"
    assert headers["x-router-key-id"] == "k1"
    assert headers["x-router-attempts"] == "1"
    assert float(headers["x-router-overhead-ms"]) >= 0
    call = emu.get("/_emulator/calls").json()[-1]
    assert call["model"] == "gpt-main" and call["key"] == UP_K1
    assert call["body"]["max_tokens"] == 50


def test_sdk_streamed_completion(gateway: Proc, emu: httpx.Client) -> None:
    client = sdk(gateway)
    text = ""
    usage = None
    finish = None
    models = set()
    with client.chat.completions.with_streaming_response.create(
        model="smart",
        messages=[{"role": "user", "content": "one two three four"}],
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-router-key-id"] == "k1"
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.parse():
            models.add(chunk.model)
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
    assert text == "echo: one two three four"
    assert finish == "stop"
    assert models == {"smart"}
    assert usage is not None and usage.completion_tokens > 0
    assert emu.get("/_emulator/calls").json()[-1]["stream"] is True


def test_sdk_tool_calls(gateway: Proc, emu: httpx.Client) -> None:
    call = {"id": "call_1", "name": "lookup", "arguments": '{"q": "trio"}'}
    script(emu, [{"tool_calls": [call]}])
    client = sdk(gateway)
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "description": "look something up",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    completion = client.chat.completions.create(model="smart", messages=HELLO, tools=tools)
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.tool_calls is not None
    fn = message.tool_calls[0].function  # type: ignore[union-attr]
    assert (fn.name, fn.arguments) == ("lookup", '{"q": "trio"}')
    sent = emu.get("/_emulator/calls").json()[-1]["body"]
    assert sent["tools"][0]["function"]["name"] == "lookup"


def test_sdk_failover_seen_only_in_headers(gateway: Proc, emu: httpx.Client) -> None:
    # The first key answers 503 to the attempt and its in-place retry: the router moves
    # on; the caller gets an ordinary answer, and only the headers tell the story.
    script(emu, [{"status": 503}, {"status": 503}], key=UP_K1)
    client = sdk(gateway)
    raw = client.chat.completions.with_raw_response.create(model="smart", messages=HELLO)
    completion = raw.parse()
    assert completion.choices[0].message.content == "echo: hello gateway"
    assert raw.status_code == 200
    assert int(raw.headers["x-router-attempts"]) == 3
    assert raw.headers["x-router-model"] == completion.model
    statuses = [c["status"] for c in emu.get("/_emulator/calls").json()]
    assert statuses == [503, 503, 200]


def test_sdk_key_failover_on_rate_limit(gateway: Proc, emu: httpx.Client) -> None:
    script(emu, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K1)
    raw = sdk(gateway).chat.completions.with_raw_response.create(model="smart", messages=HELLO)
    assert raw.parse().model == "smart"  # same model, other key
    assert raw.headers["x-router-key-id"] == "k2"
    assert raw.headers["x-router-attempts"] == "2"


def test_sdk_fallbacks_and_errors(gateway: Proc, emu: httpx.Client) -> None:
    client = sdk(gateway)
    with pytest.raises(openai.NotFoundError) as not_found:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert not_found.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        sdk(gateway, key="wrong").chat.completions.create(model="smart", messages=HELLO)
    # a per-request fallback, given in the body (extra_body) and by header
    script(emu, [{"status": 404, "error": "model_not_found"}], key=UP_K1)
    raw = client.chat.completions.with_raw_response.create(
        model="emu/gpt-gone", messages=HELLO, extra_body={"fallbacks": ["smart"]}
    )
    assert raw.parse().model == "smart"
    assert raw.headers["x-router-attempts"] == "2"
    script(emu, [{"status": 404, "error": "model_not_found"}], key=UP_K1)
    raw = client.chat.completions.with_raw_response.create(
        model="emu/gpt-other", messages=HELLO, extra_headers={"x-router-fallbacks": "smart"}
    )
    assert raw.parse().model == "smart"


def test_sdk_stream_error_after_first_chunk(gateway: Proc, emu: httpx.Client) -> None:
    script(emu, [{"status": 503, "cut_after_chunks": 1}])
    stream = sdk(gateway).chat.completions.create(
        model="smart", messages=[{"role": "user", "content": "a b c d e"}], stream=True
    )
    got = ""
    with pytest.raises(openai.APIError) as error:
        for chunk in stream:
            got += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert got  # the first chunk did arrive
    assert "interrupted" in error.value.message


# --------------------------------------------------------------------------- bad input


def _post(gateway: Proc, body: bytes, headers: dict[str, str]) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )


AUTH = {"authorization": f"Bearer {GW_KEY}"}
OK_MSGS = '[{"role": "user", "content": "x"}]'

BAD_INPUTS = [
    # (id, body, headers, status, param, code)
    ("invalid-json", b'{"model": "smart", "messages": [', AUTH, 400, None, "invalid_json"),
    ("not-an-object", b"[1, 2]", AUTH, 400, None, "invalid_value"),
    ("model-wrong-type", b'{"model": 7, "messages": ' + OK_MSGS.encode() + b"}", AUTH, 400,
     "model", "invalid_type"),
    ("messages-wrong-type", b'{"model": "smart", "messages": "hi"}', AUTH, 400, "messages",
     "invalid_type"),
    ("content-wrong-type", b'{"model": "smart", "messages": [{"role": "user", "content": 5}]}',
     AUTH, 400, "messages[0].content", "invalid_type"),
    ("bad-role", b'{"model": "smart", "messages": [{"role": "robot", "content": "x"}]}', AUTH,
     400, "messages[0].role", "invalid_value"),
    ("stream-wrong-type", b'{"model": "smart", "stream": "yes", "messages": ' + OK_MSGS.encode()
     + b"}", AUTH, 400, "stream", "invalid_type"),
    ("max-tokens-wrong-type", b'{"model": "smart", "max_tokens": "10", "messages": '
     + OK_MSGS.encode() + b"}", AUTH, 400, "max_tokens", "invalid_type"),
    ("temperature-out-of-range", b'{"model": "smart", "temperature": 9, "messages": '
     + OK_MSGS.encode() + b"}", AUTH, 400, "temperature", "invalid_value"),
    ("missing-messages", b'{"model": "smart"}', AUTH, 400, "messages", "missing_field"),
    ("empty-messages", b'{"model": "smart", "messages": []}', AUTH, 400, "messages",
     "invalid_value"),
    ("missing-model", b'{"messages": ' + OK_MSGS.encode() + b"}", AUTH, 400, "model",
     "missing_field"),
    ("unknown-model", b'{"model": "gpt-nope", "messages": ' + OK_MSGS.encode() + b"}", AUTH, 404,
     "model", "model_not_found"),
    ("unknown-fallback", b'{"model": "smart", "fallbacks": ["zz"], "messages": '
     + OK_MSGS.encode() + b"}", AUTH, 404, "fallbacks[0]", "model_not_found"),
    ("no-auth", b'{"model": "smart", "messages": ' + OK_MSGS.encode() + b"}", {}, 401, None,
     "invalid_api_key"),
    ("wrong-auth", b'{"model": "smart", "messages": ' + OK_MSGS.encode() + b"}",
     {"authorization": f"Bearer {GW_KEY}x"}, 401, None, "invalid_api_key"),
    ("admin-key-is-not-an-api-key", b'{"model": "smart", "messages": ' + OK_MSGS.encode() + b"}",
     {"authorization": f"Bearer {ADMIN_KEY}"}, 401, None, "invalid_api_key"),
    ("body-over-limit", b'{"model": "smart", "messages": [{"role": "user", "content": "'
     + b"x" * (MAX_BODY * 4) + b'"}]}', AUTH, 413, None, "request_too_large"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "headers", "status", "param", "code"),
    [case[1:] for case in BAD_INPUTS],
    ids=[case[0] for case in BAD_INPUTS],
)
def test_bad_input_matrix(
    gateway: Proc,
    emu: httpx.Client,
    http: httpx.Client,
    body: bytes,
    headers: dict[str, str],
    status: int,
    param: str | None,
    code: str,
) -> None:
    r = _post(gateway, body, headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert param.split("[")[0] in error["message"]
    assert r.headers["x-router-attempts"] == "0"
    for secret in SECRETS:
        assert secret not in r.text
    assert emu.get("/_emulator/calls").json() == []  # nothing went upstream
    assert_good(http)


def test_chunked_body_over_limit_is_refused_while_reading(
    gateway: Proc, http: httpx.Client
) -> None:
    def chunks() -> Iterator[bytes]:  # no content-length: the limit bites while reading
        yield b'{"model": "smart", "messages": [{"role": "user", "content": "'
        for _ in range(64):
            yield b"y" * 1024
        yield b'"}]}'

    r = httpx.post(f"{gateway.url}/v1/chat/completions", content=chunks(), headers=AUTH)
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large"
    assert_good(http)


def test_cancel_mid_stream_cancels_upstream(
    gateway: Proc, emu: httpx.Client, http: httpx.Client
) -> None:
    script(emu, [{"chunk_interval": 0.2}])
    body = {"model": "smart", "stream": True, "messages": [{"role": "user", "content": "a " * 40}]}
    with (
        httpx.Client(base_url=gateway.url, headers=AUTH, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=body) as r,
    ):
        assert r.status_code == 200
        first = next(line for line in r.iter_lines() if line.startswith("data: "))
        assert '"role":"assistant"' in first
    # leaving the block closed the connection mid-stream
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        calls = emu.get("/_emulator/calls").json()
        if calls and calls[-1]["disconnected"]:
            break
        time.sleep(0.05)
    else:
        raise AssertionError(f"the upstream stream was not cancelled: {calls}")
    assert not calls[-1]["completed"]
    assert_good(http)
    families = metrics(gateway)
    assert sample(families, "llm_router_gateway_in_flight") == 0
    assert sample(families, "llm_router_requests_total", model="smart", outcome="cancelled") >= 1


def test_client_timeout_cancels_upstream_attempt(
    gateway: Proc, emu: httpx.Client, http: httpx.Client
) -> None:
    script(emu, [{"latency": 3.0}])
    with pytest.raises(httpx.ReadTimeout):
        http.post("/v1/chat/completions", json={"model": "smart", "messages": HELLO}, timeout=0.3)
    deadline = time.monotonic() + 3
    while not emu.get("/_emulator/calls").json()[-1]["disconnected"]:
        assert time.monotonic() < deadline, "the upstream attempt outlived its client"
        time.sleep(0.05)
    assert_good(http)


def test_stream_error_event_without_done(
    gateway: Proc, emu: httpx.Client, http: httpx.Client
) -> None:
    script(emu, [{"status": 503, "cut_after_chunks": 2}])
    body = {"model": "smart", "stream": True, "messages": [{"role": "user", "content": "a b c d"}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert set(last["error"]) == {"message", "type", "param", "code"}
    assert last["error"]["code"] == "transient"
    assert all("error" not in json.loads(e) for e in events[:-1])
    assert_good(http)


def test_upstream_errors_map_to_statuses(
    gateway: Proc, emu: httpx.Client, http: httpx.Client
) -> None:
    body = {"model": "smart", "messages": HELLO}
    # a bad request upstream passes through as 400 with the provider's message
    script(emu, [{"status": 400, "error": "context_length"}])
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert "context" in r.json()["error"]["message"].lower()
    assert r.headers["x-router-attempts"] == "1"
    assert r.headers["x-router-key-id"] == "k1"
    # every key rate-limited for gpt-main: rate limits are per model, so the fallback
    # (another model on the same keys) serves
    script(emu, [{"status": 429, "headers": {"retry-after": "7"}}], key=UP_K1, model="gpt-main")
    script(emu, [{"status": 429, "headers": {"retry-after": "9"}}], key=UP_K2, model="gpt-main")
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    assert r.headers["x-router-model"] == "emu/gpt-backup"
    assert r.headers["x-router-attempts"] == "3"
    # every key rate-limited for every model of the chain: 429 with Retry-After (the
    # shortest wait of any model: gpt-main's lanes still cool for 7 and 9 s)
    for secret in (UP_K1, UP_K2):
        script(emu, [{"status": 429, "headers": {"retry-after": "8"}}], secret, "gpt-backup")
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 429, r.text
    assert 6 <= int(r.headers["retry-after"]) <= 9
    assert r.json()["error"]["type"] == "rate_limit_error"
    assert r.headers["x-router-attempts"] == "2"  # gpt-main's cooling lanes were skipped
    http.post("/v1/router/reset", headers={"authorization": f"Bearer {ADMIN_KEY}"}, json={})
    # the chain exhausted by upstream failures: 502
    script(emu, [{"status": 500}] * 4)
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "upstream_error"
    assert r.headers["x-router-attempts"] == "4"
    # the request's own deadline: 504
    script(emu, [{"hang": True}])
    r = http.post("/v1/chat/completions", json=body | {"timeout": 0.3})
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "deadline_exceeded"
    for secret in SECRETS:
        assert secret not in r.text
    assert_good(http)


# --------------------------------------------------------------------------- operator surface


def metrics(gateway: Proc) -> dict[str, Any]:
    r = httpx.get(f"{gateway.url}/metrics", timeout=5)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    return {f.name: f for f in text_string_to_metric_families(r.text)}


def sample(families: dict[str, Any], name: str, missing_ok: bool = False, **labels: str) -> float:
    """The sum of `name`'s samples matching `labels`; a metric with no sample at all
    fails the test unless `missing_ok` (a labelled family has none until first used)."""
    total = 0.0
    found = False
    for family in families.values():
        for s in family.samples:
            if s.name == name:
                found = True
                if all(s.labels.get(k) == v for k, v in labels.items()):
                    total += s.value
    assert found or missing_ok, f"no metric {name}"
    return total


def test_metrics_parse_and_move(gateway: Proc, emu: httpx.Client, http: httpx.Client) -> None:
    before = metrics(gateway)
    ok_before = sample(
        before,
        "llm_router_requests_total",
        missing_ok=True,  # on a fresh gateway: no request yet
        model="smart",
        provider="emu",
        key_id="k1",
        outcome="ok",
    )
    assert_good(http)
    with http.stream(
        "POST", "/v1/chat/completions", json={"model": "smart", "messages": HELLO, "stream": True}
    ) as r:
        r.read()
    script(emu, [{"status": 429}], key=UP_K1)
    assert_good(http)  # one cooldown and one failover to k2
    after = metrics(gateway)
    assert (
        sample(
            after,
            "llm_router_requests_total",
            model="smart",
            provider="emu",
            key_id="k1",
            outcome="ok",
        )
        == ok_before + 2
    )
    for name in (
        "llm_router_request_duration_seconds_count",
        "llm_router_overhead_seconds_count",
        "llm_router_time_to_first_token_seconds_count",
    ):
        assert sample(after, name) > sample(before, name, missing_ok=True), name
    assert sample(after, "llm_router_failovers_total", kind="key") >= 1
    assert sample(after, "llm_router_cooldowns_total", provider="emu", key_id="k1") >= 1
    # the 429 cooled k1's lane for gpt-main, not the key itself
    assert sample(after, "llm_router_lane_cooldown_seconds", key_id="k1", model="gpt-main") > 0
    assert sample(after, "llm_router_key_cooldown_seconds", key_id="k1") == 0
    assert sample(after, "llm_router_key_breaker_state", key_id="k1") == 0
    assert sample(after, "llm_router_key_in_flight", key_id="k2") == 0
    assert "llm_router_retries" in after
    assert sample(after, "llm_router_model_health", model="smart") == 0


def test_health_ready_models(gateway: Proc, http: httpx.Client) -> None:
    assert httpx.get(f"{gateway.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz")
    assert ready.status_code == 200 and ready.json()["callable_keys"] == 2
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["smart"]
    assert httpx.get(f"{gateway.url}/v1/models").status_code == 401
    r = httpx.get(f"{gateway.url}/nope")
    assert r.status_code == 404 and "error" in r.json()
    assert {
        "x-router-model",
        "x-router-provider",
        "x-router-key-id",
        "x-router-attempts",
        "x-router-overhead-ms",
    } <= set(r.headers)


def test_admin_state_and_reset(gateway: Proc, emu: httpx.Client, http: httpx.Client) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    assert http.get("/v1/router/state").status_code == 401  # the API key is not the admin key
    assert httpx.get(f"{gateway.url}/v1/router/state").status_code == 401
    script(emu, [{"status": 429, "headers": {"retry-after": "60"}}], key=UP_K1)
    assert_good(http)
    state = httpx.get(f"{gateway.url}/v1/router/state", headers=admin)
    assert state.status_code == 200
    keys = {k["key_id"]: k for k in state.json()["keys"]}
    # the rate limit cooled k1's lane for gpt-main; the key's own state is untouched
    assert keys["k1"]["cooling_reason"] is None and keys["k1"]["cooling_for"] == 0
    lane = _lane(state.json(), "k1", "gpt-main")
    assert 50 < lane["cooling_for"] <= 60 and lane["rate_limit_hits"] == 1
    assert lane["cooling_source"] == "local"
    for secret in SECRETS:
        assert secret not in state.text
    bad = httpx.post(
        f"{gateway.url}/v1/router/reset", headers=admin, json={"provider": "emu", "key_id": "zz"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "key_id"
    reset = httpx.post(
        f"{gateway.url}/v1/router/reset", headers=admin, json={"provider": "emu", "key_id": "k1"}
    )
    assert reset.status_code == 200
    state = httpx.get(f"{gateway.url}/v1/router/state", headers=admin).json()
    assert {k["key_id"]: k["cooling_for"] for k in state["keys"]}["k1"] == 0
    assert _lane(state, "k1", "gpt-main")["cooling_for"] == 0  # a key's reset clears its lanes


def _lane(state: dict[str, Any], key_id: str, model: str) -> dict[str, Any]:
    key = next(k for k in state["keys"] if k["key_id"] == key_id)
    return next(lane for lane in key["lanes"] if lane["model"] == model)


def test_admin_reset_of_one_lane(gateway: Proc, emu: httpx.Client, http: httpx.Client) -> None:
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    limited = [{"status": 429, "headers": {"retry-after": "60"}}]
    script(emu, limited, key=UP_K1, model="gpt-main")
    script(emu, limited, key=UP_K1, model="gpt-backup")
    assert_good(http)  # k1's gpt-main lane cools; k2 serves
    r = http.post("/v1/chat/completions", json={"model": "emu/gpt-backup", "messages": HELLO})
    assert r.status_code == 200 and r.headers["x-router-key-id"] == "k2"
    state = httpx.get(f"{gateway.url}/v1/router/state", headers=admin).json()
    assert _lane(state, "k1", "gpt-main")["cooling_for"] > 50
    assert _lane(state, "k1", "gpt-backup")["cooling_for"] > 50

    reset = f"{gateway.url}/v1/router/reset"
    for body, param in [
        ({"upstream": "gpt-main"}, "provider"),  # a lane needs its provider
        ({"key_id": "k1", "upstream": "gpt-main"}, "provider"),
        ({"provider": "nope", "upstream": "gpt-main"}, "provider"),
        ({"provider": "emu", "key_id": "zz", "upstream": "gpt-main"}, "key_id"),
    ]:
        bad = httpx.post(reset, headers=admin, json=body)
        assert bad.status_code == 400, body
        assert bad.json()["error"]["param"] == param, body
    bad = httpx.post(reset, headers=admin, json={"provider": "emu", "lane": "gpt-main"})
    assert bad.status_code == 400 and "lane" in bad.json()["error"]["message"]
    assert http.post("/v1/router/reset", json={"provider": "emu"}).status_code == 401

    body = {"provider": "emu", "key_id": "k1", "upstream": "gpt-main"}
    ok = httpx.post(reset, headers=admin, json=body)
    assert ok.status_code == 200
    assert ok.json() == {"ok": True, "model": None, **body}
    state = httpx.get(f"{gateway.url}/v1/router/state", headers=admin).json()
    assert _lane(state, "k1", "gpt-main")["cooling_for"] == 0
    assert _lane(state, "k1", "gpt-main")["rate_limit_hits"] == 0
    assert _lane(state, "k1", "gpt-backup")["cooling_for"] > 50  # the other lane keeps cooling
    r = http.post("/v1/chat/completions", json={"model": "smart", "messages": HELLO})
    assert r.status_code == 200 and r.headers["x-router-key-id"] == "k1"

    # without key_id: that model's lane on every key of the provider
    ok = httpx.post(reset, headers=admin, json={"provider": "emu", "upstream": "gpt-backup"})
    assert ok.status_code == 200 and ok.json()["key_id"] is None
    state = httpx.get(f"{gateway.url}/v1/router/state", headers=admin).json()
    assert _lane(state, "k1", "gpt-backup")["cooling_for"] == 0
    r = http.post("/v1/chat/completions", json={"model": "emu/gpt-backup", "messages": HELLO})
    assert r.status_code == 200 and r.headers["x-router-key-id"] == "k1"


def test_lane_metrics_move_on_a_rate_limit(
    gateway: Proc, emu: httpx.Client, http: httpx.Client
) -> None:
    lane = {"provider": "emu", "key_id": "k1", "model": "gpt-main"}
    before = metrics(gateway)
    cooling_before = sample(before, "llm_router_lane_cooldown_seconds", missing_ok=True, **lane)
    assert cooling_before == 0
    script(emu, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K1, model="gpt-main")
    assert_good(http)  # k1's gpt-main lane cools; k2 serves
    after = metrics(gateway)
    assert 25 < sample(after, "llm_router_lane_cooldown_seconds", **lane) <= 30
    assert sample(after, "llm_router_lane_breaker_state", **lane) == 0  # thresholds are high
    assert sample(after, "llm_router_lane_breaker_opens_total", **lane) == 0
    other = {"provider": "emu", "key_id": "k2", "model": "gpt-main"}
    assert sample(after, "llm_router_lane_cooldown_seconds", **other) == 0
    assert sample(after, "llm_router_lane_breaker_state", **other) == 0
    # the key's own gauges stay clear: a 429 belongs to the model on the key
    assert sample(after, "llm_router_key_cooldown_seconds", key_id="k1") == 0
    assert sample(after, "llm_router_key_breaker_state", key_id="k1") == 0
    httpx.post(
        f"{gateway.url}/v1/router/reset",
        headers={"authorization": f"Bearer {ADMIN_KEY}"},
        json={"provider": "emu", "key_id": "k1", "upstream": "gpt-main"},
    ).raise_for_status()
    assert sample(metrics(gateway), "llm_router_lane_cooldown_seconds", **lane) == 0


def test_tenant_from_gateway_key(gateway: Proc, emu: httpx.Client) -> None:
    # bob's key comes from an env: secret and maps to tenant "bob" (its id)
    completion = sdk(gateway, key=GW_KEY_BOB).chat.completions.create(model="smart", messages=HELLO)
    assert completion.choices[0].message.content == "echo: hello gateway"
    sdk(gateway).chat.completions.create(model="smart", messages=HELLO)
    admin = {"authorization": f"Bearer {ADMIN_KEY}"}
    state = httpx.get(f"{gateway.url}/v1/router/state", headers=admin).json()
    # per-tenant breakers are per lane: both tenants have one on k1's gpt-main lane
    assert {"team-a", "bob"} <= set(_lane(state, "k1", "gpt-main")["tenant_breakers"])


# --------------------------------------------------------------------------- CLI


def test_check_command(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(_config("http://127.0.0.1:9"))
    env = {**os.environ, "TEST_GW_BOB_KEY": GW_KEY_BOB, "TEST_EMU_K2": UP_K2}
    done = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=20,
    )
    assert done.returncode == 0, done.stderr
    assert "1. smart -> emu/gpt-main" in done.stdout
    assert "2. emu/gpt-backup -> emu/gpt-backup" in done.stdout
    assert "env:TEST_EMU_K2" in done.stdout  # the variable's name, never its value
    for secret in SECRETS:
        assert secret not in done.stdout + done.stderr
    config.write_text(_config("http://127.0.0.1:9").replace('upstream = "gpt-main"', ""))
    bad = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=20,
    )
    assert bad.returncode == 2
    assert "models[0]" in bad.stderr and "upstream" in bad.stderr


# --------------------------------------------------------------------------- shutdown


def test_sigterm_lets_in_flight_requests_finish(emulator: Proc, tmp_path: Path) -> None:
    proc = _start_gateway(tmp_path, emulator.url, grace=10.0)
    try:
        with httpx.Client(base_url=emulator.url) as emu:
            emu.post("/_emulator/reset")
            script(emu, [{"latency": 1.0}] * 3)
        results: list[httpx.Response | BaseException] = []

        def call(i: int) -> None:
            try:
                results.append(
                    httpx.post(
                        f"{proc.url}/v1/chat/completions",
                        headers=AUTH,
                        json={"model": "smart", "messages": [{"role": "user", "content": f"n{i}"}]},
                        timeout=10,
                    )
                )
            except BaseException as exc:
                results.append(exc)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 5
        while sample(metrics(proc), "llm_router_gateway_in_flight") < 3:
            assert time.monotonic() < deadline, "requests never got in flight"
            time.sleep(0.02)
        proc.proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(f"{proc.url}/healthz", timeout=2)
        for t in threads:
            t.join(timeout=10)
        assert proc.proc.wait(timeout=10) == 0
        assert len(results) == 3
        for r in results:
            assert isinstance(r, httpx.Response), r
            assert r.status_code == 200
            assert r.json()["choices"][0]["message"]["content"].startswith("echo: n")
    finally:
        proc.kill()
