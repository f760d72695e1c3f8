"""The access log of `llm-router serve`: one JSON line per request on stderr (a real
served process with the emulator behind it), the request id echoed as ``x-request-id``,
no secret anywhere in the log, and ``--access-log off``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway import Proc
from test_gateway_fidelity import ADMIN, KEY, SECRETS, UP_KEY, _config

HELLO = [{"role": "user", "content": "hello access log"}]
AUTH = {"authorization": f"Bearer {KEY}"}


def _serve(config: Path, *extra: str) -> Proc:
    return Proc(
        ["-m", "router", "serve", "--config", str(config), "--port", "0", *extra],
        "listening on",
    )


@pytest.fixture(scope="module")
def config(emulator: Proc, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("access") / "router.toml"
    path.write_text(_config(emulator.url))
    return path


@pytest.fixture(scope="module")
def gateway(config: Path) -> Iterator[Proc]:
    proc = _serve(config)
    try:
        yield proc
    finally:
        proc.kill()
        log = proc.stderr()
        assert "Traceback" not in log, log[-3000:]
        for secret in SECRETS:
            assert secret not in log, "a secret reached the gateway's log"


@pytest.fixture
def emu(emulator: Proc, gateway: Proc) -> Iterator[httpx.Client]:
    admin = {"authorization": f"Bearer {ADMIN}"}
    with httpx.Client(base_url=emulator.url, timeout=5) as client:
        client.post("/_emulator/reset").raise_for_status()
        httpx.post(f"{gateway.url}/v1/router/reset", headers=admin, timeout=5).raise_for_status()
        yield client
        client.post("/_emulator/reset").raise_for_status()


def access_lines(proc: Proc) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proc.stderr().splitlines() if line.startswith("{")]


def logged(proc: Proc, request_id: str) -> dict[str, Any]:
    """The access-log entry of `request_id` (written just after the response)."""
    deadline = time.monotonic() + 5
    while True:
        found = [e for e in access_lines(proc) if e["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.02)


def chat(gateway: Proc, body: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json=body,
        headers={**AUTH, **headers},
        timeout=10,
    )


def test_a_request_logs_one_json_line_without_secrets(gateway: Proc, emu: httpx.Client) -> None:
    r = chat(gateway, {"model": "smart", "messages": HELLO}, **{"x-request-id": "req-1.a:b_c"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "req-1.a:b_c"
    entry = logged(gateway, "req-1.a:b_c")
    assert entry["method"] == "POST"
    assert entry["path"] == "/v1/chat/completions"
    assert entry["status"] == 200
    assert entry["tenant"] == "alice"
    assert entry["model_asked"] == "smart"
    assert (entry["model"], entry["provider"], entry["key_id"]) == ("smart", "emu", "k1")
    assert entry["stream"] is False
    assert [(a["model"], a["key_id"], a["outcome"]) for a in entry["attempts"]] == [
        ("smart", "k1", "ok")
    ]
    assert entry["attempts"][0]["duration_ms"] >= 0
    assert entry["latency_ms"] >= entry["overhead_ms"] >= 0
    assert entry["overhead_ms"] == pytest.approx(float(r.headers["x-router-overhead-ms"]))
    assert entry["input_tokens"] > 0 and entry["output_tokens"] > 0
    assert entry["time"].endswith("+00:00") and "T" in entry["time"]
    assert "error" not in entry and "segments" not in entry
    assert "hello access log" not in gateway.stderr()  # no message content
    log = gateway.stderr()
    for secret in SECRETS:
        assert secret not in log


def test_a_request_id_is_generated_when_absent_or_unusable(
    gateway: Proc, emu: httpx.Client
) -> None:
    r = chat(gateway, {"model": "smart", "messages": HELLO})
    generated = r.headers["x-request-id"]
    assert generated and logged(gateway, generated)["status"] == 200
    bad = chat(gateway, {"model": "smart", "messages": HELLO}, **{"x-request-id": "a b/c"})
    assert bad.headers["x-request-id"] not in ("a b/c", generated)
    long = chat(gateway, {"model": "smart", "messages": HELLO}, **{"x-request-id": "x" * 129})
    assert long.headers["x-request-id"] != "x" * 129
    # errors carry it too, and are logged with their kind
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        json={"model": "smart", "messages": HELLO},
        headers={"authorization": "Bearer wrong", "x-request-id": "unauth-1"},
        timeout=10,
    )
    assert r.status_code == 401 and r.headers["x-request-id"] == "unauth-1"
    entry = logged(gateway, "unauth-1")
    assert (entry["status"], entry["error"], entry["tenant"]) == (401, "invalid_api_key", None)
    # probes are not logged and carry no request id
    assert "x-request-id" not in httpx.get(f"{gateway.url}/healthz", timeout=5).headers


def test_a_failing_request_logs_its_error_kind_and_attempts(
    gateway: Proc, emu: httpx.Client
) -> None:
    emu.post(
        "/_emulator/script", json={"key": UP_KEY, "model": "gpt-main", "faults": [{"status": 500}]}
    ).raise_for_status()
    r = chat(gateway, {"model": "smart", "messages": HELLO}, **{"x-request-id": "fail-1"})
    assert r.status_code >= 500, r.text
    assert r.headers["x-request-id"] == "fail-1"
    entry = logged(gateway, "fail-1")
    assert entry["status"] == r.status_code
    assert entry["error"] and entry["error"] != "ok"
    assert entry["attempts"] and entry["attempts"][0]["key_id"] == "k1"
    assert entry["attempts"][0]["outcome"] != "ok"


def test_a_continued_stream_logs_its_segments(gateway: Proc, emu: httpx.Client) -> None:
    emu.post(
        "/_emulator/script",
        json={"key": UP_KEY, "model": "gpt-replay", "faults": [{"cut_after_chunks": 2}]},
    ).raise_for_status()
    body = {
        "model": "replayable",
        "messages": [{"role": "user", "content": "one two three four five six seven"}],
        "stream": True,
    }
    headers = {**AUTH, "x-request-id": "stream-1"}
    with httpx.stream(
        "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=headers, timeout=10
    ) as response:
        assert response.status_code == 200
        assert response.headers["x-request-id"] == "stream-1"
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
    entry = logged(gateway, "stream-1")
    assert entry["stream"] is True and entry["status"] == 200
    segments = entry["segments"]
    assert [(s["provider"], s["key_id"], s["mode"]) for s in segments] == [
        ("emu", "k1", "first"),
        ("emu2", "k2", "replay"),
    ]
    assert all(s["chars"] > 0 for s in segments)
    assert "one two three" not in gateway.stderr()


def test_access_log_off_logs_nothing(config: Path, emu: httpx.Client) -> None:
    proc = _serve(config, "--access-log", "off")
    try:
        r = chat(proc, {"model": "smart", "messages": HELLO})
        assert r.status_code == 200 and r.headers["x-request-id"]
        time.sleep(0.3)
        assert access_lines(proc) == []
    finally:
        proc.kill()


def test_access_log_text_is_one_readable_line(config: Path, emu: httpx.Client) -> None:
    proc = _serve(config, "--access-log", "text")
    try:
        r = chat(proc, {"model": "smart", "messages": HELLO}, **{"x-request-id": "text-1"})
        assert r.status_code == 200
        deadline = time.monotonic() + 5
        while not (lines := [x for x in proc.stderr().splitlines() if " text-1 " in x]):
            assert time.monotonic() < deadline, proc.stderr()
            time.sleep(0.02)
        assert "POST /v1/chat/completions 200" in lines[0]
        assert "tenant=alice" in lines[0] and "model=smart->smart" in lines[0]
    finally:
        proc.kill()
