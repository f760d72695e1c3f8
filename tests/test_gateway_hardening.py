"""The gateway against hostile input and overload: a real `llm-router serve` process on
loopback (the emulator behind it, as in test_gateway.py), sent the bad-input matrix
(malformed JSON, wrong types, huge and deeply nested bodies, oversize headers, stalled
bodies, amplification, out-of-range numbers, wrong keys on admin endpoints), plus
admission control, the connection cap, the timeout clamp and draining with workers.

Every case checks the status, the OpenAI error shape, that nothing reached the
emulator where nothing should, and that an ordinary request still succeeds after it.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest
import trio
from test_gateway import Proc, script

from router import RouterConfig
from router._router import Router
from router.gateway import GatewayApp

KEY = "hard-secret-alice-0001"
KEY_CAROL = "hard-secret-carol-0002"
ADMIN = "hard-admin-secret-0003"
UP_KEY = "sk-hard-upstream-0004"
SECRETS = (KEY, KEY_CAROL, ADMIN, UP_KEY)
MAX_BODY = 262_144
MAX_CONNECTIONS = 12


def _config(emulator_url: str, *, grace: float = 5.0, max_in_flight: int = 2) -> str:
    return f"""
[router]
timeout = 5.0
attempt_timeout = 2.0
first_token_timeout = 2.0
idle_timeout = 2.0
transient_retries = 1
retry_backoff = [0.01]
retry_jitter = 0.0
seed = 5

[router.breaker]
failure_threshold = 1000
minimum_calls = 1000
window = 1000

[gateway]
admin_key = "{ADMIN}"
max_body_bytes = {MAX_BODY}
body_timeout = 1.0
max_in_flight = {max_in_flight}
max_connections = {MAX_CONNECTIONS}
shutdown_grace = {grace}
api_keys = [
    {{ id = "alice", secret = "{KEY}" }},
    {{ id = "carol", secret = "{KEY_CAROL}", models = ["smart", "cheap", "emu/gpt-extra"] }},
]

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k1", secret = "{UP_KEY}" }}]

[[models]]
name = "smart"
provider = "emu"
upstream = "gpt-main"

[[models]]
name = "cheap"
provider = "emu"
upstream = "gpt-cheap"

[[models]]
name = "other"
provider = "emu"
upstream = "gpt-other"
"""


def _serve(
    tmp: Path, emulator_url: str, *extra: str, grace: float = 5.0, max_in_flight: int = 2
) -> Proc:
    config = tmp / "router.toml"
    config.write_text(_config(emulator_url, grace=grace, max_in_flight=max_in_flight))
    return Proc(
        ["-m", "router", "serve", "--config", str(config), "--port", "0", *extra],
        "listening on",
    )


@pytest.fixture(scope="module")
def gateway(emulator: Proc, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    proc = _serve(tmp_path_factory.mktemp("hard"), emulator.url)
    try:
        yield proc
    finally:
        proc.kill()
        log = proc.stderr()
        assert "Traceback" not in log, log[-3000:]
        for secret in SECRETS:
            assert secret not in log


@pytest.fixture
def emu(emulator: Proc, gateway: Proc) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, timeout=5) as client:
        client.post("/_emulator/reset").raise_for_status()
        yield client
        client.post("/_emulator/reset").raise_for_status()


AUTH = {"authorization": f"Bearer {KEY}"}
CAROL = {"authorization": f"Bearer {KEY_CAROL}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
HELLO = [{"role": "user", "content": "hello"}]


def assert_good(gateway: Proc) -> None:
    r = httpx.post(
        f"{gateway.url}/v1/chat/completions",
        headers=AUTH,
        json={"model": "smart", "messages": HELLO},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "echo: hello"


def assert_error(body: bytes | str, status: int, code: str | None, param: Any = ...) -> None:
    """An OpenAI error body with `code` (and `param` when given); no secret in it."""
    text = body.decode() if isinstance(body, bytes) else body
    error = json.loads(text)["error"]
    assert set(error) == {"message", "type", "param", "code"}, text
    assert error["message"]
    if code is not None:
        assert error["code"] == code, text
    if param is not ...:
        assert error["param"] == param, text
    for secret in SECRETS:
        assert secret not in text


# --------------------------------------------------------------------------- the matrix

MSGS = b'[{"role": "user", "content": "x"}]'


def _chat(extra: bytes) -> bytes:
    return b'{"model": "smart", "messages": ' + MSGS + extra + b"}"


def _nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return (
        b'{"model": "smart", "messages": '
        + MSGS
        + b', "x": '
        + open_ * depth
        + close * depth
        + b"}"
    )


def _deep_tool(depth: int) -> bytes:
    schema = '{"type": "object", "properties": {"a": ' * depth + '{"type": "string"}' + "}}" * depth
    tool = f'{{"type": "function", "function": {{"name": "f", "parameters": {schema}}}}}'
    return _chat(b', "tools": [' + tool.encode() + b"]")


_MANY_ADHOC = json.dumps([f"emu/made-up-{i}" for i in range(1000)]).encode()
_MANY_SMART = json.dumps(["cheap"] * 1000).encode()

Case = tuple[str, str, bytes, dict[str, str], int, str | None, Any]
# (id, path, body, headers, status, code, param (... = any))
CASES: list[Case] = [
    ("malformed-json", "/v1/chat/completions", b'{"model": "smart", "messages": [', AUTH, 400,
     "invalid_json", None),
    ("not-utf8", "/v1/chat/completions", b"\xff\xfe\x00{", AUTH, 400, "invalid_json", None),
    ("empty-body", "/v1/chat/completions", b"", AUTH, 400, "invalid_json", None),
    ("body-is-a-string", "/v1/chat/completions", b'"hi"', AUTH, 400, "invalid_value", None),
    ("model-wrong-type", "/v1/chat/completions", b'{"model": ["smart"], "messages": ' + MSGS
     + b"}", AUTH, 400, "invalid_type", "model"),
    ("messages-wrong-type", "/v1/chat/completions", b'{"model": "smart", "messages": {}}', AUTH,
     400, "invalid_type", "messages"),
    ("fallbacks-wrong-type", "/v1/chat/completions", _chat(b', "fallbacks": {"a": 1}'), AUTH, 400,
     "invalid_type", "fallbacks"),
    ("model-control-chars", "/v1/chat/completions", b'{"model": "smart\\r\\nx-evil: 1", '
     b'"messages": ' + MSGS + b"}", AUTH, 400, "invalid_value", "model"),
    ("model-too-long", "/v1/chat/completions", b'{"model": "emu/' + b"m" * 5000 + b'", '
     b'"messages": ' + MSGS + b"}", AUTH, 400, "invalid_value", "model"),
    ("body-over-limit", "/v1/chat/completions", _chat(b', "x": "' + b"y" * MAX_BODY + b'"'), AUTH,
     413, "request_too_large", None),
    ("nested-1000", "/v1/chat/completions", _nested(1000), AUTH, 400, "nesting_too_deep", None),
    ("nested-100000", "/v1/chat/completions", _nested(100_000), AUTH, 400, "nesting_too_deep",
     None),
    ("nested-objects", "/v1/chat/completions", _nested(5000, b'{"a":', b"}"), AUTH, 400,
     "nesting_too_deep", None),
    ("nested-100-under-recursion-limit", "/v1/chat/completions", _nested(100), AUTH, 400,
     "nesting_too_deep", None),
    ("deep-tool-schema", "/v1/chat/completions", _deep_tool(40), AUTH, 400, "nesting_too_deep",
     None),
    ("reset-nested-100000", "/v1/router/reset", b"[" * 100_000 + b"]" * 100_000, ADMIN_AUTH, 400,
     "nesting_too_deep", None),
    ("reset-nested-object", "/v1/router/reset", b'{"provider": ' + b"[" * 3000 + b"]" * 3000
     + b"}", ADMIN_AUTH, 400, "nesting_too_deep", None),
    ("reset-malformed", "/v1/router/reset", b'{"provider": ', ADMIN_AUTH, 400, "invalid_json",
     None),
    ("timeout-nan-literal", "/v1/chat/completions", _chat(b', "timeout": NaN'), AUTH, 400,
     "invalid_json", "timeout"),
    ("timeout-infinity-literal", "/v1/chat/completions", _chat(b', "timeout": -Infinity'), AUTH,
     400, "invalid_json", "timeout"),
    ("timeout-1e999", "/v1/chat/completions", _chat(b', "timeout": 1e999'), AUTH, 400,
     "invalid_json", "timeout"),
    ("timeout-nan-string", "/v1/chat/completions", _chat(b', "timeout": "NaN"'), AUTH, 400,
     "invalid_type", "timeout"),
    ("timeout-string", "/v1/chat/completions", _chat(b', "timeout": "x"'), AUTH, 400,
     "invalid_type", "timeout"),
    ("timeout-negative", "/v1/chat/completions", _chat(b', "timeout": -1'), AUTH, 400,
     "invalid_value", "timeout"),
    ("timeout-zero", "/v1/chat/completions", _chat(b', "timeout": 0'), AUTH, 400,
     "invalid_value", "timeout"),
    ("timeout-huge-int", "/v1/chat/completions", _chat(b', "timeout": -' + b"9" * 400), AUTH,
     400, "invalid_value", "timeout"),
    ("temperature-huge", "/v1/chat/completions", _chat(b', "temperature": 1e308'), AUTH, 400,
     "invalid_value", "temperature"),
    ("temperature-huge-int", "/v1/chat/completions", _chat(b', "temperature": ' + b"9" * 400),
     AUTH, 400, "invalid_value", "temperature"),
    ("max-tokens-huge", "/v1/chat/completions", _chat(b', "max_tokens": ' + b"9" * 30), AUTH, 400,
     "invalid_value", "max_tokens"),
    ("max-tokens-float", "/v1/chat/completions", _chat(b', "max_tokens": 1e30'), AUTH, 400,
     "invalid_type", "max_tokens"),
    ("n-huge", "/v1/chat/completions", _chat(b', "n": ' + b"9" * 50), AUTH, 400, "invalid_value",
     "n"),
    # amplification: at most max_chain (8) models, only configured names as fallbacks
    ("1000-adhoc-fallbacks", "/v1/chat/completions", _chat(b', "fallbacks": ' + _MANY_ADHOC),
     AUTH, 400, "too_many_fallbacks", "fallbacks"),
    ("1000-configured-fallbacks", "/v1/chat/completions", _chat(b', "fallbacks": ' + _MANY_SMART),
     AUTH, 400, "too_many_fallbacks", "fallbacks"),
    ("adhoc-fallback", "/v1/chat/completions", _chat(b', "fallbacks": ["cheap", "emu/gpt-x"]'),
     AUTH, 400, "fallbacks_not_allowed", "fallbacks[1]"),
    ("adhoc-fallback-header", "/v1/chat/completions", _chat(b""),
     {**AUTH, "x-router-fallbacks": "cheap, emu/gpt-x"}, 400, "fallbacks_not_allowed",
     "x-router-fallbacks"),
    # a key with a `models` list
    ("key-model-not-listed", "/v1/chat/completions", b'{"model": "other", "messages": ' + MSGS
     + b"}", CAROL, 403, "model_not_allowed", "model"),
    ("key-adhoc-model-not-listed", "/v1/chat/completions", b'{"model": "emu/gpt-main", '
     b'"messages": ' + MSGS + b"}", CAROL, 403, "model_not_allowed", "model"),
    ("key-fallback-not-listed", "/v1/chat/completions", _chat(b', "fallbacks": ["cheap", "other"]'),
     CAROL, 403, "model_not_allowed", "fallbacks[1]"),
    ("key-header-fallback-not-listed", "/v1/chat/completions", _chat(b""),
     {**CAROL, "x-router-fallbacks": "other"}, 403, "model_not_allowed", "x-router-fallbacks"),
    # wrong keys
    ("chat-no-key", "/v1/chat/completions", _chat(b""), {}, 401, "invalid_api_key", None),
    ("chat-admin-key", "/v1/chat/completions", _chat(b""), ADMIN_AUTH, 401, "invalid_api_key",
     None),
    ("reset-api-key", "/v1/router/reset", b"{}", AUTH, 401, "invalid_api_key", None),
    ("reset-wrong-admin-key", "/v1/router/reset", b"{}",
     {"authorization": f"Bearer {ADMIN}x"}, 401, "invalid_api_key", None),
    ("reset-basic-auth", "/v1/router/reset", b"{}", {"authorization": f"Basic {ADMIN}"}, 401,
     "invalid_api_key", None),
    ("reset-unknown-field", "/v1/router/reset", b'{"everything": true}', ADMIN_AUTH, 400, None,
     None),
]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "code", "param"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_bad_input_matrix(
    gateway: Proc,
    emu: httpx.Client,
    path: str,
    body: bytes,
    headers: dict[str, str],
    status: int,
    code: str | None,
    param: Any,
) -> None:
    r = httpx.post(
        f"{gateway.url}{path}",
        content=body,
        headers={"content-type": "application/json", **headers},
        timeout=10,
    )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert_error(r.content, status, code, param)
    if path == "/v1/chat/completions":
        assert r.headers["x-router-attempts"] == "0"
    assert emu.get("/_emulator/calls").json() == []  # nothing went upstream
    assert_good(gateway)


def test_admin_state_with_wrong_keys(gateway: Proc) -> None:
    for headers in ({}, AUTH, CAROL, {"authorization": "Bearer"}):
        r = httpx.get(f"{gateway.url}/v1/router/state", headers=headers, timeout=5)
        assert r.status_code == 401, headers
        assert_error(r.content, 401, "invalid_api_key")
    r = httpx.get(f"{gateway.url}/v1/router/state", headers=ADMIN_AUTH, timeout=5)
    assert r.status_code == 200
    assert httpx.post(f"{gateway.url}/v1/router/state", headers=ADMIN_AUTH).status_code == 405


# --------------------------------------------------------------------------- raw HTTP


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    return parts.hostname, parts.port


class Raw:
    """One raw HTTP/1.1 exchange: what came back and how long it took."""

    def __init__(self, url: str, data: bytes | list[bytes], *, wait: float = 6.0) -> None:
        started = time.monotonic()
        received = bytearray()
        with socket.create_connection(_address(url), timeout=wait) as sock:
            for i, part in enumerate([data] if isinstance(data, bytes) else data):
                if i:
                    time.sleep(0.1)
                sock.sendall(part)
            while True:
                try:
                    chunk = sock.recv(65536)
                except (TimeoutError, ConnectionResetError):
                    break
                if not chunk:
                    break
                received += chunk
        self.elapsed = time.monotonic() - started
        head, _, self.body = bytes(received).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split()[1]) if lines[0] else 0
        self.headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
        }
        length = self.headers.get("content-length")
        if length is not None:
            self.body = self.body[: int(length)]
        elif self.headers.get("transfer-encoding") == "chunked":
            body, rest = bytearray(), self.body
            while rest:
                size, _, rest = rest.partition(b"\r\n")
                if int(size, 16) == 0:
                    break
                body += rest[: int(size, 16)]
                rest = rest[int(size, 16) + 2 :]
            self.body = bytes(body)


CHAT_HEAD = (
    "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
    f"authorization: Bearer {KEY}\r\ncontent-type: application/json\r\n"
)
GOOD = _chat(b"")

RAW_CASES = [
    # (id, request bytes, status, code, at most seconds)
    ("garbage-request-line", b"\x16\x03\x01 hello there\r\n\r\n", 400, "bad_http_request", 1.0),
    ("bad-content-length", (CHAT_HEAD + "content-length: ten\r\n\r\n").encode(), 400,
     "bad_http_request", 1.0),
    ("conflicting-content-lengths", (CHAT_HEAD + "content-length: 5\r\ncontent-length: 6\r\n\r\n")
     .encode(), 400, "bad_http_request", 1.0),
    # h11 measures a head while it is incomplete: send it in two parts
    ("oversize-headers", [(CHAT_HEAD + "x-big: " + "a" * 20_000).encode(), b"\r\n\r\n"], 431,
     "headers_too_large", 1.0),
    ("transfer-encoding-gzip", (CHAT_HEAD + "transfer-encoding: gzip\r\n\r\n").encode(), 501,
     "not_implemented", 1.0),
    ("content-length-and-chunked", (CHAT_HEAD + "content-length: 5\r\n"
     "transfer-encoding: chunked\r\n\r\n").encode(), 400, "ambiguous_framing", 0.5),
    ("body-shorter-than-content-length", (CHAT_HEAD + f"content-length: {len(GOOD) + 10}\r\n\r\n")
     .encode() + GOOD, 408, "request_timeout", 2.5),
    ("body-stalled", (CHAT_HEAD + "content-length: 100\r\n\r\n").encode(), 408, "request_timeout",
     2.5),
    ("chunked-body-stalled", (CHAT_HEAD + "transfer-encoding: chunked\r\n\r\n5\r\n{\"mod").encode(),
     408, "request_timeout", 2.5),
    ("reset-body-stalled", (f"POST /v1/router/reset HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer "
     f"{ADMIN}\r\ncontent-length: 50\r\n\r\n{{").encode(), 408, "request_timeout", 2.5),
]  # fmt: skip


@pytest.mark.parametrize(
    ("data", "status", "code", "within"),
    [case[1:] for case in RAW_CASES],
    ids=[case[0] for case in RAW_CASES],
)
def test_protocol_level_rejections(
    gateway: Proc,
    emu: httpx.Client,
    data: bytes | list[bytes],
    status: int,
    code: str,
    within: float,
) -> None:
    raw = Raw(gateway.url, data)
    assert raw.status == status, (raw.status, raw.body)
    assert raw.headers["content-type"] == "application/json"
    assert raw.headers["connection"] == "close"
    assert_error(raw.body, status, code)
    assert raw.elapsed < within, raw.elapsed
    if status == 408:
        assert raw.elapsed >= 0.9  # body_timeout = 1 s
    assert emu.get("/_emulator/calls").json() == []
    assert_good(gateway)


# --------------------------------------------------------------------------- tenants


def test_key_models_and_fallback_policy(gateway: Proc, emu: httpx.Client) -> None:
    models = httpx.get(f"{gateway.url}/v1/models", headers=CAROL).json()
    assert [(m["id"], m["owned_by"]) for m in models["data"]] == [
        ("smart", "emu"),
        ("cheap", "emu"),
        ("emu/gpt-extra", "emu"),
    ]
    everything = httpx.get(f"{gateway.url}/v1/models", headers=AUTH).json()
    assert [m["id"] for m in everything["data"]] == ["smart", "cheap", "other"]
    chat = f"{gateway.url}/v1/chat/completions"
    # carol may call her models, configured or `provider/upstream`, with listed fallbacks
    for model in ("cheap", "emu/gpt-extra"):
        r = httpx.post(chat, headers=CAROL, json={"model": model, "messages": HELLO})
        assert r.status_code == 200, r.text
    script(emu, [{"status": 404, "error": "model_not_found"}], model="gpt-extra")
    r = httpx.post(
        chat,
        headers=CAROL,
        json={"model": "emu/gpt-extra", "messages": HELLO, "fallbacks": ["cheap"]},
    )
    assert r.status_code == 200 and r.headers["x-router-model"] == "cheap", r.text
    # a key without a list may still call a `provider/upstream` model itself, and name
    # configured models as fallbacks (in the body or the header)
    script(emu, [{"status": 404, "error": "model_not_found"}], model="gpt-gone")
    r = httpx.post(
        chat,
        headers={**AUTH, "x-router-fallbacks": "cheap"},
        json={"model": "emu/gpt-gone", "messages": HELLO},
    )
    assert r.status_code == 200 and r.headers["x-router-model"] == "cheap", r.text
    assert [c["model"] for c in emu.get("/_emulator/calls").json()] == [
        "gpt-cheap",
        "gpt-extra",
        "gpt-extra",  # model_not_found: on to the fallback
        "gpt-cheap",
        "gpt-gone",
        "gpt-cheap",
    ]


# --------------------------------------------------------------------------- timeouts


def test_request_timeout_is_clamped_to_the_operators(gateway: Proc, emu: httpx.Client) -> None:
    # three models that hang, 2 s per attempt: 12 s of attempts without a deadline
    script(emu, [{"hang": True}] * 12)
    body = {"model": "smart", "messages": HELLO, "fallbacks": ["cheap", "other"], "timeout": 1e308}
    started = time.monotonic()
    r = httpx.post(f"{gateway.url}/v1/chat/completions", headers=AUTH, json=body, timeout=20)
    elapsed = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert_error(r.content, 504, "deadline_exceeded")
    assert 4.5 < elapsed < 6.5, elapsed  # [router] timeout = 5
    # a shorter deadline is the caller's to ask for
    started = time.monotonic()
    r = httpx.post(f"{gateway.url}/v1/chat/completions", headers=AUTH, json=body | {"timeout": 0.4})
    assert r.status_code == 504 and time.monotonic() - started < 1.5
    emu.post("/_emulator/reset").raise_for_status()
    assert_good(gateway)


# --------------------------------------------------------------------------- admission


def _in_background(call: Callable[[], httpx.Response]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(call())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _ready(gateway: Proc) -> httpx.Response:
    return httpx.get(f"{gateway.url}/readyz", timeout=5)


def test_max_in_flight_sheds_load(gateway: Proc, emu: httpx.Client) -> None:
    script(emu, [{"latency": 1.5}] * 2)
    calls = []
    for n in range(2):
        body = {"model": "smart", "messages": [{"role": "user", "content": f"slow {n}"}]}
        calls.append(
            _in_background(
                lambda body=body: httpx.post(  # type: ignore[misc]
                    f"{gateway.url}/v1/chat/completions", headers=AUTH, json=body, timeout=10
                )
            )
        )
    deadline = time.monotonic() + 5
    while _ready(gateway).json().get("in_flight") != 2:
        assert time.monotonic() < deadline, "the slow requests never got in flight"
        time.sleep(0.02)
    ready = _ready(gateway)
    assert ready.status_code == 503
    assert ready.json()["status"] == "overloaded" and ready.json()["overload"] == "in_flight"
    for stream in (False, True):
        r = httpx.post(
            f"{gateway.url}/v1/chat/completions",
            headers=AUTH,
            json={"model": "smart", "messages": HELLO, "stream": stream},
            timeout=5,
        )
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert_error(r.content, 503, "overloaded")
    assert len(emu.get("/_emulator/calls").json()) == 2  # the refused ones went nowhere
    for thread, out in calls:
        thread.join(timeout=10)
        assert isinstance(out[0], httpx.Response) and out[0].status_code == 200, out
    assert _ready(gateway).status_code == 200
    assert_good(gateway)


def test_max_connections(gateway: Proc, emu: httpx.Client) -> None:
    idle = []
    try:
        for _ in range(MAX_CONNECTIONS):
            idle.append(socket.create_connection(_address(gateway.url), timeout=5))
        time.sleep(0.2)
        raw = Raw(gateway.url, (CHAT_HEAD + f"content-length: {len(GOOD)}\r\n\r\n").encode() + GOOD)
        assert raw.status == 503, raw.body
        assert raw.headers["retry-after"] == "1"
        assert_error(raw.body, 503, "too_many_connections")
    finally:
        for sock in idle:
            sock.close()
    deadline = time.monotonic() + 5
    while True:  # the gateway sees the closes in a moment
        try:
            assert_good(gateway)
            break
        except AssertionError:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert emu.get("/_emulator/calls").json()[:-1] == []


# ------------------------------------------------------------------- queue delay, in process


class _HypercornStream:
    """Stands in for Hypercorn's HTTPStream: `app_send` bound to an object whose
    `start_time` is when the request head was parsed."""

    def __init__(self, parsed_ago: float) -> None:
        self.start_time = time.time() - parsed_ago
        self.events: list[dict[str, Any]] = []

    async def app_send(self, event: dict[str, Any]) -> None:
        self.events.append(event)


async def _call(app: GatewayApp, body: bytes, parsed_ago: float = 0.0) -> tuple[int, bytes]:
    stream = _HypercornStream(parsed_ago)
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop()
        await trio.sleep_forever()
        raise AssertionError

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"content-type", b"application/json")],
    }
    await app(scope, receive, stream.app_send)
    status = stream.events[0]["status"]
    return status, b"".join(e.get("body", b"") for e in stream.events[1:])


async def test_queue_delay_refuses_requests_that_waited() -> None:
    config = RouterConfig.from_dict(
        {
            "providers": [
                {
                    "name": "sim",
                    "kind": "simulated",
                    "keys": [{"id": "a"}],
                    "simulate": {"latency": 0},
                }
            ],
            "models": [{"name": "m", "provider": "sim", "upstream": "m"}],
            "gateway": {"max_queue_delay": 0.2},
        }
    )
    app = GatewayApp(config)
    body = msgspec.json.encode({"model": "m", "messages": HELLO})
    async with Router.open(config) as router, trio.open_nursery() as nursery:
        app.router = router
        nursery.start_soon(app.watch_event_loop)
        await trio.sleep(0.1)
        assert (await _call(app, body))[0] == 200
        # Hypercorn parsed this request's head a second ago: it waited too long
        status, answer = await _call(app, body, parsed_ago=1.0)
        assert status == 503
        assert_error(answer, 503, "overloaded")
        assert b"wait more than 0.2 s" in answer
        # the event loop itself is late (something blocked it): every request waited
        time.sleep(0.5)  # noqa: ASYNC251 - blocking the event loop is the point
        status, answer = await _call(app, body)
        assert status == 503
        await trio.sleep(0.15)  # the loop is on time again
        assert (await _call(app, body))[0] == 200
        nursery.cancel_scope.cancel()


# --------------------------------------------------------------------------- draining


def test_sigterm_with_workers_refuses_new_connections_and_answers_the_cut(
    emulator: Proc, tmp_path: Path
) -> None:
    grace = 1.5
    proc = _serve(tmp_path, emulator.url, "--workers", "2", grace=grace, max_in_flight=8)
    try:
        deadline = time.monotonic() + 15
        while True:  # the parent listens at once; the workers take a moment to start
            try:
                if _ready(proc).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, proc.stderr()
            time.sleep(0.1)
        with httpx.Client(base_url=emulator.url) as emu:
            emu.post("/_emulator/reset").raise_for_status()
            script(emu, [{"latency": 0.5}], model="gpt-main")
            script(emu, [{"hang": True}] * 4, model="gpt-cheap")  # past the grace
            script(emu, [{"chunk_interval": 0.3}], model="gpt-other")
            chat = f"{proc.url}/v1/chat/completions"
            quick = _in_background(
                lambda: httpx.post(
                    chat, headers=AUTH, json={"model": "smart", "messages": HELLO}, timeout=20
                )
            )
            slow = _in_background(
                lambda: httpx.post(
                    chat, headers=AUTH, json={"model": "cheap", "messages": HELLO}, timeout=20
                )
            )
            lines: list[str] = []

            def stream() -> httpx.Response:
                body = {"model": "other", "stream": True, "messages": [
                    {"role": "user", "content": " ".join(["w"] * 40)}]}  # fmt: skip
                with httpx.stream("POST", chat, headers=AUTH, json=body, timeout=20) as r:
                    lines.extend(line for line in r.iter_lines() if line.startswith("data: "))
                return r

            streaming = _in_background(stream)
            deadline = time.monotonic() + 5
            while len(emu.get("/_emulator/calls").json()) < 3 or not lines:
                assert time.monotonic() < deadline, (
                    emu.get("/_emulator/calls").json(),
                    lines,
                    quick[1],
                    slow[1],
                    streaming[1],
                    proc.stderr(),
                )
                time.sleep(0.02)
        proc.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.3)
        for _ in range(5):  # refused outright, never accepted and then reset
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{proc.url}/healthz", timeout=2)
        quick[0].join(timeout=10)
        assert quick[1][0].status_code == 200, quick[1]
        slow[0].join(timeout=10)
        cut = slow[1][0]
        assert isinstance(cut, httpx.Response), cut
        assert cut.status_code == 503, cut.text
        assert_error(cut.content, 503, "shutting_down")
        assert grace - 0.2 < time.monotonic() - signalled < grace + 1.5
        streaming[0].join(timeout=10)
        assert isinstance(streaming[1][0], httpx.Response), streaming[1]
        assert len(lines) > 1 and "[DONE]" not in lines[-1]
        assert_error(lines[-1][6:], 503, "shutting_down")
        assert proc.proc.wait(timeout=10) == 0
        assert "Traceback" not in proc.stderr()
    finally:
        proc.kill()
