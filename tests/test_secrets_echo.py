"""No credential leaves the process, even when an upstream repeats every one it gets.

A config holds every kind of credential the product knows: provider keys (literal and
``env:``), credential headers (``api-key``, ``X-Upstream-Token``) and a header whose
value comes from ``env:``, a base_url with ``user:password@`` (sent as HTTP Basic), a
base_url with credential query parameters, a Redis URL with a userinfo password and a
``?password=``, the gateway's admin key and its API keys. The provider emulator answers
with errors (400, 401, 404, 429, 500, malformed 2xx bodies, in-stream error events
before and after the first chunk, response headers) that repeat those credentials,
whole and cut at many positions, including across the 300-character error snippet.

Every output is then searched for every credential, whole or as any run of 8 of its
characters: errors (str, repr, args, attempts) and snapshots from the library API,
log records at DEBUG (httpx's included); and from a real `llm-router serve` process,
every response body and header, /v1/router/state, /metrics and the process's log at
DEBUG; and the output of `llm-router check`.

The first part checks the pieces (`mask_url`, `url_secrets`, `Scrubber`,
`error_snippet` at the cut) directly.
"""

from __future__ import annotations

import base64
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from router import (
    ChatRequest,
    ConfigError,
    Message,
    ProviderConfig,
    Router,
    RouterConfig,
    RouterError,
    StreamInterruptedError,
)
from router._classify import SNIPPET_LIMIT, error_snippet, redact
from router._secrets import (
    Scrubber,
    header_is_secret,
    mask_url,
    mask_urls_in,
    scrubber_for,
    scrubbing,
    url_secrets,
)
from router.emulator import Emulator, Fault

# --------------------------------------------------------------------------- credentials
# None looks like an API key (no sk-, AIza, "Bearer"), so the generic key-like
# redaction cannot hide them: only scrubbing of the known values can.

KEY_OAI = "oai-Q7w9Zt3LmX2pVb8Nc4Rd"
KEY_ANT = "ant-Fz2Rt7Yq4Wn9Vc5Ks3Mb"  # from env:TEST_ECHO_ANT_KEY
KEY_GEM = "gem-R8tWu2Ep5Ay7Ld3Ji6Go"
HDR_API_KEY = "azk-Ub3Ne7Ri2Oc5Yx9Ta4Gw"  # header api-key
HDR_TOKEN = "tok-Pm6Sd1Ze8Kv3Bh7Qn2Jc"  # header X-Upstream-Token
HDR_ENV = "hev-Lw4Xa9Ft2Gy7Ro5Ui1Ek"  # header X-Org-Ref = env:TEST_ECHO_HDR
BASE_USER = "echo"
BASE_PASS = "bpw-Cs8Vt3Nq6Wd1Zm4Hr9Py"  # base_url user:password@
BASIC = base64.b64encode(f"{BASE_USER}:{BASE_PASS}".encode()).decode()
SPARE_KEY = "spk-Hd4Rw9Lc2Xn7Tg5Bq8Mv"  # base_url ?api_key=
SPARE_SIG = "sig-Wv6Kp1Ns8Jf3Qz5Ye2Ra"  # base_url &sig=
REDIS_PASS = "rpw-Ea5Mo2Qb7Xk4Ig9Tu3Fn"
REDIS_QPASS = "rqp-Dj1Yh6Wl3Cv8Ns5Ak2Re"
GW_ADMIN = "adm-Kx7Bq2Zp9Rm4Tw6Hc3Vn"
GW_KEY = "gwk-Sa3Ld8Fe1Yo6Pj4Qm9Ux"
GW_KEY_ENV = "gwe-Nb5Tc2Gi7Wr4Zk1Ho8Ls"  # from env:TEST_ECHO_GW_KEY
SPARE_PROVIDER_KEY = "spr-Gm3Vx8Kd5Wq2Lt7Nc9Jh"

CREDENTIALS = (
    KEY_OAI,
    KEY_ANT,
    KEY_GEM,
    HDR_API_KEY,
    HDR_TOKEN,
    HDR_ENV,
    BASE_PASS,
    BASIC,
    SPARE_KEY,
    SPARE_SIG,
    REDIS_PASS,
    REDIS_QPASS,
    GW_ADMIN,
    GW_KEY,
    GW_KEY_ENV,
    SPARE_PROVIDER_KEY,
)
ENV = {"TEST_ECHO_ANT_KEY": KEY_ANT, "TEST_ECHO_HDR": HDR_ENV, "TEST_ECHO_GW_KEY": GW_KEY_ENV}
# What each provider's upstream receives, and may repeat.
RECEIVED = {
    "oai": (KEY_OAI, HDR_API_KEY, HDR_TOKEN, HDR_ENV),
    "ant": (KEY_ANT, BASIC, BASE_PASS),
    "gem": (KEY_GEM,),
}
PROTOCOL = {"oai": "openai", "ant": "anthropic", "gem": "gemini"}
ECHO = "upstream echo"
RUN = 8


def leaks(text: str) -> list[str]:
    """Every credential found in `text`, whole or as a run of `RUN` of its characters."""
    found = []
    for secret in CREDENTIALS:
        if any(secret[i : i + RUN] in text for i in range(len(secret) - RUN + 1)):
            found.append(secret)
    return found


def assert_clean(what: str, text: str) -> None:
    found = leaks(text)
    assert not found, f"{what} shows {found}: {text[:2000]}"


def config_text(emulator_url: str, redis_port: int) -> str:
    host = emulator_url.removeprefix("http://")
    return f"""
[router]
timeout = 10.0
attempt_timeout = 5.0
first_token_timeout = 5.0
idle_timeout = 5.0
transient_retries = 0
rate_limit_wait = 0.0
retry_jitter = 0.0

[router.shared]
redis_url = "redis://default:{REDIS_PASS}@127.0.0.1:{redis_port}/0?password={REDIS_QPASS}"
timeout = 0.2
ping_interval = 0.2

[gateway]
admin_key = "{GW_ADMIN}"
api_keys = [
    {{ id = "alice", secret = "{GW_KEY}" }},
    {{ id = "bob", secret = "env:TEST_ECHO_GW_KEY" }},
]

[[providers]]
name = "oai"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "o1", secret = "{KEY_OAI}" }}]

[providers.headers]
api-key = "{HDR_API_KEY}"
X-Upstream-Token = "{HDR_TOKEN}"
X-Org-Ref = "env:TEST_ECHO_HDR"
OpenAI-Organization = "org-visible"

[[providers]]
name = "ant"
kind = "anthropic"
base_url = "http://{BASE_USER}:{BASE_PASS}@{host}"
keys = [{{ id = "a1", secret = "env:TEST_ECHO_ANT_KEY" }}]

[[providers]]
name = "gem"
kind = "gemini"
base_url = "{emulator_url}"
keys = [{{ id = "g1", secret = "{KEY_GEM}" }}]

[[providers]]
name = "spare"
kind = "openai"
base_url = "https://proxy.invalid/v1?api_key={SPARE_KEY}&sig={SPARE_SIG}&region=eu"
keys = [{{ id = "s1", secret = "{SPARE_PROVIDER_KEY}" }}]

[[models]]
name = "oai"
provider = "oai"
upstream = "gpt-echo"

[[models]]
name = "ant"
provider = "ant"
upstream = "claude-echo"

[[models]]
name = "gem"
provider = "gem"
upstream = "gemini-echo"
"""


def dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# --------------------------------------------------------------------------- echoes


def echo_messages(received: tuple[str, ...]) -> list[str]:
    """Messages repeating `received`: all of them whole and in pieces, then each one
    across the 300-character snippet cut at several positions."""
    pieces = []
    for s in received:
        pieces += [s, s[:-1], s[1:], s[:12], s[-12:], s[4:16]]
    messages = [f"{ECHO}: " + " | ".join(pieces)]
    for s in received:
        for inside in (1, 3, 8, len(s) // 2, len(s) - 1):
            # `s` starts `inside` characters before the snippet's last kept character.
            pad = SNIPPET_LIMIT - 1 - inside - len(ECHO) - 2
            messages.append(f"{ECHO} {'p' * pad} {s} tail")
    return messages


def error_json(protocol: str, status: int, message: str) -> dict[str, Any]:
    if protocol == "openai":
        kind = {400: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
        return {"error": {"message": message, "type": kind, "code": None}}
    if protocol == "anthropic":
        kind = {400: "invalid_request_error", 401: "authentication_error"}.get(status, "api_error")
        if status == 429:
            kind = "rate_limit_error"
        return {"type": "error", "error": {"type": kind, "message": message}}
    state = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 429: "RESOURCE_EXHAUSTED"}
    return {"error": {"code": status, "message": message, "status": state.get(status, "INTERNAL")}}


def sse(protocol: str, message: str, *, content_first: bool) -> str:
    """A 2xx event stream: (a content chunk, then) an error event carrying `message`."""
    frames = []
    if protocol == "openai":
        if content_first:
            frames.append('data: {"choices":[{"index":0,"delta":{"content":"partial "}}]}')
        body = msgspec.json.encode(error_json("openai", 500, message)).decode()
        frames.append(f"data: {body}")
    elif protocol == "anthropic":
        if content_first:
            frames.append(
                "event: content_block_delta\ndata: "
                '{"type":"content_block_delta","index":0,'
                '"delta":{"type":"text_delta","text":"partial "}}'
            )
        body = msgspec.json.encode(error_json("anthropic", 500, message)).decode()
        frames.append(f"event: error\ndata: {body}")
    else:
        if content_first:
            frames.append(
                'data: {"candidates":[{"content":{"parts":[{"text":"partial "}],"role":"model"}}]}'
            )
        body = msgspec.json.encode(error_json("gemini", 500, message)).decode()
        frames.append(f"data: {body}")
    return "\n\n".join(frames) + "\n\n"


def echo_cases(model: str) -> list[tuple[bool, Fault]]:
    """(stream?, fault) for every way an upstream can repeat what it received."""
    protocol = PROTOCOL[model]
    received = RECEIVED[model]
    everything = f"{ECHO}: " + " ".join(received)
    headers = {f"x-echo-{n}": s for n, s in enumerate(received)}
    cases: list[tuple[bool, Fault]] = []
    for message in echo_messages(received):
        cases.append((False, Fault(status=400, body=error_json(protocol, 400, message))))
    for status in (401, 429, 500):
        body = error_json(protocol, status, everything)
        cases.append((False, Fault(status=status, body=body, headers=headers)))
        cases.append((True, Fault(status=status, body=body, headers=headers)))
    # A 404 naming no model: a route 404, reworded with the URL and logged.
    cases.append((False, Fault(status=404, body=f"not here: {everything}")))
    # A plain-text and an HTML error page, a malformed 2xx body and stream event.
    cases.append((False, Fault(status=502, body=f"bad gateway {everything}")))
    cases.append((False, Fault(status=503, body=f"<html><p>{everything}</p></html>")))
    cases.append((False, Fault(status=200, body=f"{{not json {everything}")))
    cases.append((True, Fault(status=200, body=f"data: {{not json {everything}\n\n")))
    # In-stream error events before and after the first content chunk.
    for message in (everything, *echo_messages(received)[1:3]):
        for first in (False, True):
            body = sse(protocol, message, content_first=first)
            cases.append((True, Fault(status=200, body=body)))
    return cases


# ------------------------------------------------------------------------- the pieces


def test_mask_url_hides_every_credential() -> None:
    cases = {
        "redis://u:pw@h:1/0": "redis://u:***@h:1/0",
        "redis://:pw@h": "redis://:***@h",
        "redis://pw@h": "redis://***@h",
        "redis://h:6379/0": "redis://h:6379/0",
        "env:REDIS_URL": "env:REDIS_URL",
        "redis://h/0?password=abc&db=2": "redis://h/0?password=***&db=2",
        "rediss://u:p@h/0?PassWord=x": "rediss://u:***@h/0?PassWord=***",
        "unix:///run/r.sock?pwd=x&db=1": "unix:///run/r.sock?pwd=***&db=1",
        "https://h/v1?api-version=2024&api_key=k&apiKey=k2&sig=s": (
            "https://h/v1?api-version=2024&api_key=***&apiKey=***&sig=***"
        ),
        "https://h/x?access_token=t&token=u&key=v&secret=w&signature=z&pass=q": (
            "https://h/x?access_token=***&token=***&key=***&secret=***&signature=***&pass=***"
        ),
        "https://h/x?X-Amz-Signature=a;X-Amz-Security-Token=b": (
            "https://h/x?X-Amz-Signature=***;X-Amz-Security-Token=***"
        ),
        "https://h/cb#access_token=t&state=1": "https://h/cb#access_token=***&state=1",
        "https://user:p@ss/w@host:8443/v1": "https://user:***@host:8443/v1",
        "https://api.openai.com/v1": "https://api.openai.com/v1",
        "not a url": "not a url",
    }
    for url, masked in cases.items():
        assert mask_url(url) == masked, url
    text = "failed: redis://u:pw1234@h/0?password=qq9876 and https://a:b1234@c/d?sig=zz1234."
    assert mask_urls_in(text) == (
        "failed: redis://u:***@h/0?password=*** and https://a:***@c/d?sig=***."
    )


def test_url_secrets() -> None:
    url = "https://us%65r:p%40ss@h/v1?api_key=k%2Fey&region=eu&sig=s1"
    found = url_secrets(url)
    assert "p%40ss" in found and "p@ss" in found
    assert base64.b64encode(b"user:p@ss").decode() in found
    assert "k%2Fey" in found and "k/ey" in found and "s1" in found
    assert "eu" not in found
    assert url_secrets("env:X") == [] and url_secrets("https://h/v1") == []


def test_header_is_secret() -> None:
    for name in ("api-key", "Authorization", "X-API-Key", "Proxy-Authorization", "x-goog-api-key"):
        assert header_is_secret(name, "v")
    for name in ("X-Upstream-Token", "client-secret", "Cookie"):
        assert header_is_secret(name, "v")
    assert header_is_secret("X-Org-Ref", "env:SOME_VAR")
    assert not header_is_secret("OpenAI-Organization", "org-1")
    assert not header_is_secret("anthropic-version", "2023-06-01")


def test_scrubber_whole_and_pieces() -> None:
    secret = "Zq8Wm3Tz6Ly1PxHj5Kq8"
    scrub = Scrubber([secret, "abc"]).scrub
    assert scrub(f"a {secret} b") == "a *** b"
    assert scrub(f"cut {secret[:-1]}") == "cut ***"
    assert scrub(f"{secret[1:]} rest") == "*** rest"
    assert scrub(f"x {secret[5:13]} y") == "x *** y"  # any run of 8
    assert scrub(f"x {secret[:7]} y") == f"x {secret[:7]} y"  # 7: not recognisable
    assert scrub("abc is too short to scrub") == "abc is too short to scrub"
    assert scrub("nothing here") == "nothing here"
    short = Scrubber(["Ab3dE6"]).scrub  # 6 characters: runs of 5 count
    assert short("x Ab3dE y") == "x *** y" and short("x Ab3d y") == "x Ab3d y"
    assert scrubber_for([secret]) is scrubber_for([secret])


def test_error_snippet_scrubs_before_the_cut() -> None:
    secret = "plainsecretvalue0123456789"
    for inside in range(1, len(secret)):
        text = "p" * (SNIPPET_LIMIT - 1 - inside) + secret + " tail"
        for snippet in (
            error_snippet(text, secrets=secret),
            redact(error_snippet(text, secrets=[secret])),
        ):
            assert len(snippet) <= SNIPPET_LIMIT
            assert not any(secret[i : i + RUN] in snippet for i in range(len(secret) - RUN + 1))
        with scrubbing(scrubber_for([secret])):
            snippet = error_snippet(text)
        assert not any(secret[i : i + RUN] in snippet for i in range(len(secret) - RUN + 1))


def test_error_snippet_leaves_no_residue_when_scrubbing_shrinks_the_text() -> None:
    # Many secrets in a row: scrubbed, the text shrinks below the limit, so what is
    # shown comes from far past the first raw `limit` characters; not a character of
    # a secret may remain, whichever piece of one ends the text.
    secret = "Hk7Wd2Lp9Xq4Rv6Mb3Ty"
    for end in range(1, len(secret) + 1):
        text = " | ".join([secret] * 40 + [secret[:end]])
        snippet = error_snippet(text, secrets=[secret])
        assert set(snippet.replace("[redacted]", "")) <= set(" |…"), (end, snippet)


def test_reprs_mask_urls_and_headers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    config = RouterConfig.from_toml(config_text("http://127.0.0.1:9", 9))
    texts = [repr(config), str(config), *map(repr, config.providers)]
    assert config.router.shared is not None
    texts.append(repr(config.router.shared))
    for text in texts:
        assert_clean("a config repr", text)
    assert isinstance(config.providers[3], ProviderConfig)
    assert "api_key=***" in repr(config.providers[3])


# ------------------------------------------------------------------------- library API


@asynccontextmanager
async def library_rig(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[Emulator, Router, RouterConfig]]:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    async with Emulator.serve(port=0) as emu:
        config = RouterConfig.from_toml(config_text(emu.url, dead_port()))
        async with Router.open(config) as router:
            yield emu, router, config


async def test_header_env_variable_must_be_set(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TEST_ECHO_HDR")
    config = RouterConfig.from_toml(config_text("http://127.0.0.1:9", 9))
    with pytest.raises(ConfigError) as info:
        async with Router.open(config):
            pass
    assert info.value.field == "providers['oai'].headers.X-Org-Ref"
    with pytest.raises(ConfigError) as info:
        RouterConfig.from_toml(
            config_text("http://127.0.0.1:9", 9).replace("env:TEST_ECHO_HDR", "env:")
        )
    assert info.value.field == "providers[0].headers.X-Org-Ref"


def request(model: str) -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hello")])


def error_texts(exc: BaseException) -> list[str]:
    texts = [str(exc), repr(exc), str(exc.args)]
    for attr in ("last_error", "cause"):
        inner = getattr(exc, attr, None)
        if inner is not None:
            texts += [str(inner), repr(inner), str(inner.args)]
    texts += [repr(a) for a in getattr(exc, "attempts", None) or ()]
    return texts


async def test_library_api_echoes_are_scrubbed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[tuple[str, str]] = []
    messages: list[str] = []
    async with library_rig(monkeypatch) as (emu, router, config):
        for model in ("oai", "ant", "gem"):
            for stream, fault in echo_cases(model):
                emu.script(fault)
                try:
                    if stream:
                        async with router.stream(request(model)) as answer:
                            async for _ in answer:
                                pass
                    else:
                        await router.submit(request(model))
                except RouterError as exc:
                    if isinstance(exc, StreamInterruptedError):
                        assert exc.partial_text == "partial "
                    messages.append(str(exc))
                    texts += [(f"{model} error {fault.status}", t) for t in error_texts(exc)]
                else:
                    raise AssertionError(f"{model}: {fault} did not fail")
                texts.append(("snapshot", msgspec.json.encode(router.snapshot()).decode()))
                router.reset()
            assert emu.pending() == 0  # every scripted answer was asked for
        snapshot = router.snapshot()
        texts += [("snapshot repr", repr(snapshot)), ("router repr", repr(router))]
        for runtime in router._runtimes.values():
            texts.append(("provider repr", repr(runtime.provider)))
            texts += [("actor repr", repr(a)) for a in runtime.actors]
        calls = list(emu.calls)
    texts += [("config repr", repr(config))]
    for record in caplog.records:
        texts += [("log", record.getMessage()), ("log args", repr(record.args))]
        texts.append(("log exc", record.exc_text or ""))
    texts.append(("log text", caplog.text))

    # Not vacuous: every credential reached the upstream, the env: header resolved,
    # the upstream's words reached the errors, and the logs hold the masked URLs.
    oai = next(c for c in calls if c.protocol == "openai")
    assert oai.key == KEY_OAI
    assert oai.headers["api-key"] == HDR_API_KEY
    assert oai.headers["x-upstream-token"] == HDR_TOKEN
    assert oai.headers["x-org-ref"] == HDR_ENV
    assert oai.headers["openai-organization"] == "org-visible"
    ant = next(c for c in calls if c.protocol == "anthropic")
    assert ant.key == KEY_ANT and ant.headers["authorization"] == f"Basic {BASIC}"
    assert next(c for c in calls if c.protocol == "gemini").key == KEY_GEM
    assert sum(ECHO in m for m in messages) > 50
    assert snapshot.shared is not None
    assert "default:***@" in snapshot.shared.redis_url
    assert "password=***" in snapshot.shared.redis_url
    log = caplog.text
    assert f"{BASE_USER}:***@" in log  # httpx's request lines and the route-404 line
    assert "Redis at redis://default:***@" in log
    for what, text in texts:
        assert_clean(what, text)


# --------------------------------------------------------------------------- processes


class Proc:
    """A subprocess whose first stdout line carrying a URL is its address."""

    def __init__(self, args: list[str], marker: str, log: Path) -> None:
        self.log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            stdout=subprocess.PIPE,
            stderr=self._log,
            env={**os.environ, **ENV},
            text=True,
        )
        found: list[str] = []

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                if marker in line and "http://" in line:
                    found.append(line[line.index("http://") :].strip())
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout=15)
        if not found:
            self.stop()
            raise RuntimeError(f"process did not start: {self.log()}")
        self.url = found[0]

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[tuple[Proc, Proc, Path]]:
    emulator = Proc(["-m", "router.emulator", "--port", "0"], "http://", tmp_path / "emu.log")
    config = tmp_path / "router.toml"
    config.write_text(config_text(emulator.url, dead_port()))
    try:
        gateway = Proc(
            [
                "-m",
                "router",
                "serve",
                "--config",
                str(config),
                "--port",
                "0",
                "--log-level",
                "DEBUG",
            ],
            "listening on",
            tmp_path / "gateway.log",
        )
    except BaseException:
        emulator.stop()
        raise
    try:
        yield emulator, gateway, config
    finally:
        gateway.stop()
        emulator.stop()


def _sync_drive(emulator: Proc, gateway: Proc) -> list[tuple[str, str]]:
    """Every echo case through the gateway; (what, text) of everything it answered."""
    texts: list[tuple[str, str]] = []
    user = {"authorization": f"Bearer {GW_KEY}"}
    admin = {"authorization": f"Bearer {GW_ADMIN}"}
    with (
        httpx.Client(base_url=gateway.url, timeout=20) as gw,
        httpx.Client(base_url=emulator.url, timeout=10) as emu,
    ):

        def shown(what: str, response: httpx.Response) -> None:
            texts.append((f"{what} body", response.text))
            texts.append((f"{what} headers", repr(list(response.headers.items()))))

        echoed = 0
        for model in ("oai", "ant", "gem"):
            for stream, fault in echo_cases(model):
                faults = [msgspec.to_builtins(fault)]
                emu.post("/_emulator/script", json={"faults": faults}).raise_for_status()
                body: dict[str, Any] = {
                    "model": model,
                    "messages": [{"role": "user", "content": "hello"}],
                    "stream": stream,
                }
                response = gw.post("/v1/chat/completions", json=body, headers=user)
                assert response.status_code != 200 or stream, response.text
                echoed += ECHO in response.text
                shown(f"{model} {fault.status} stream={stream}", response)
                gw.post("/v1/router/reset", headers=admin).raise_for_status()
        assert echoed > 50  # the upstream's words did reach the bodies
        # A normal answer with the env: gateway key, then every other endpoint.
        ok = gw.post(
            "/v1/chat/completions",
            json={"model": "oai", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {GW_KEY_ENV}"},
        )
        assert ok.status_code == 200, ok.text
        shown("ok", ok)
        state = gw.get("/v1/router/state", headers=admin)
        assert state.status_code == 200
        shared = state.json()["shared"]
        assert "default:***@" in shared["redis_url"]
        assert "password=***" in shared["redis_url"]
        shown("state", state)
        for path in ("/metrics", "/v1/models", "/readyz", "/healthz"):
            shown(path, gw.get(path, headers=user))
        shown("wrong admin", gw.get("/v1/router/state", headers=user))
        shown("wrong key", gw.post("/v1/chat/completions", json={}, headers=admin))
        calls = emu.get("/_emulator/calls").json()
    received = {c["key"] for c in calls} | {
        v for c in calls for v in c["headers"].values() if v in CREDENTIALS
    }
    assert {KEY_OAI, KEY_ANT, KEY_GEM, HDR_API_KEY, HDR_TOKEN, HDR_ENV} <= received
    return texts


async def test_gateway_process_echoes_are_scrubbed(
    processes: tuple[Proc, Proc, Path],
) -> None:
    emulator, gateway, _ = processes
    texts = await trio.to_thread.run_sync(_sync_drive, emulator, gateway)
    gateway.stop()
    log = gateway.log()
    assert " DEBUG " in log or " INFO " in log
    assert "Redis at redis://default:***@" in log
    assert "base_url 'http://echo:***@" in log  # the route-404 line
    texts.append(("gateway log", log))
    for what, text in texts:
        assert_clean(what, text)


def test_check_masks_every_credential(tmp_path: Path) -> None:
    config = tmp_path / "router.toml"
    config.write_text(config_text("http://127.0.0.1:9", 9))
    done = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert_clean("check output", out)
    assert f"http://{BASE_USER}:***@127.0.0.1:9" in out
    assert "?api_key=***&sig=***&region=eu" in out
    assert "redis://default:***@127.0.0.1:9/0?password=***" in out
    assert "header api-key: ***" in out and "header X-Org-Ref: env:TEST_ECHO_HDR" in out
    assert "header OpenAI-Organization: org-visible" in out
    # A header's env: variable must be set, as `serve` needs it.
    env = {k: v for k, v in {**os.environ, **ENV}.items() if k != "TEST_ECHO_HDR"}
    bad = subprocess.run(
        [sys.executable, "-m", "router", "check", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "providers[0].headers.X-Org-Ref" in bad.stderr
    assert_clean("check error", bad.stdout + bad.stderr)
