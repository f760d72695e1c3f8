"""Live reload of a running gateway over real HTTP: a real `llm-router serve` process on
loopback (the emulator behind it) whose config file is rewritten while clients keep
sending requests; SIGHUP (forwarded to every worker under ``--workers``) and the admin
endpoint POST /v1/router/reload apply it. No request may fail across a reload, and a bad
file must leave the running config in place.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from test_gateway import Proc

KEY = "reload-secret-alice-0001"
ADMIN = "reload-admin-secret-0002"
UP1 = "sk-reload-upstream-k1-0003"
UP2 = "sk-reload-upstream-k2-0004"
SECRETS = (KEY, ADMIN, UP1, UP2)
AUTH = {"authorization": f"Bearer {KEY}"}
ADMIN_AUTH = {"authorization": f"Bearer {ADMIN}"}
HELLO = [{"role": "user", "content": "hello"}]


def config_text(
    emulator_url: str,
    keys: tuple[str, ...] = ("k1",),
    models: tuple[str, ...] = ("smart",),
    *,
    api_keys: str = "",
) -> str:
    secrets = {"k1": UP1, "k2": UP2}
    key_list = ", ".join(f'{{ id = "{k}", secret = "{secrets[k]}" }}' for k in keys)
    text = f"""
[router]
timeout = 10.0
attempt_timeout = 5.0
transient_retries = 1
retry_backoff = [0.01]

[gateway]
admin_key = "{ADMIN}"
max_in_flight = 64
api_keys = [{{ id = "alice", secret = "{KEY}" }}{api_keys}]

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{key_list}]
"""
    for m in models:
        text += f'\n[[models]]\nname = "{m}"\nprovider = "emu"\nupstream = "gpt-{m}"\n'
    return text


def write(path: Path, text: str) -> None:
    """Replace the file at once, as an editor or a deploy tool would."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def start(path: Path, *extra: str) -> Proc:
    proc = Proc(["-m", "router", "serve", "--config", str(path), "--port", "0", *extra], "http://")
    deadline = time.monotonic() + 20
    while True:  # with --workers the parent listens at once; workers take a moment
        try:
            if httpx.get(f"{proc.url}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, proc.stderr()
        time.sleep(0.1)


def stop(proc: Proc) -> str:
    proc.proc.send_signal(signal.SIGTERM)
    try:
        proc.proc.wait(timeout=20)
    finally:
        proc.kill()
    log = proc.stderr()
    assert "Traceback" not in log, log[-3000:]
    for secret in SECRETS:
        assert secret not in log
    return log


def wait_for(proc: Proc, text: str, count: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.stderr().count(text) < count:
        assert time.monotonic() < deadline, proc.stderr()[-3000:]
        time.sleep(0.05)


def chat(url: str, model: str, client: httpx.Client | None = None) -> httpx.Response:
    body = {"model": model, "messages": HELLO}
    if client is not None:
        return client.post("/v1/chat/completions", headers=AUTH, json=body)
    return httpx.post(f"{url}/v1/chat/completions", headers=AUTH, json=body, timeout=20)


class Load:
    """Clients sending requests in a loop (some keep their connection, some open a new
    one each time) until stopped; every non-200 answer or error is kept."""

    def __init__(self, url: str, model: str, clients: int = 6) -> None:
        self.url = url
        self.model = model
        self.ok = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(i % 2 == 0,), daemon=True)
            for i in range(clients)
        ]
        for t in self._threads:
            t.start()

    def _run(self, keep_alive: bool) -> None:
        with httpx.Client(base_url=self.url, timeout=20) as client:
            while not self._stop.is_set():
                try:
                    r = chat(self.url, self.model, client if keep_alive else None)
                    if r.status_code == 200:
                        self.ok += 1
                    else:
                        self.failures.append(f"{r.status_code} {r.text[:300]}")
                except httpx.HTTPError as exc:
                    self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)


def state_keys(url: str) -> list[str]:
    snap = httpx.get(f"{url}/v1/router/state", headers=ADMIN_AUTH, timeout=5).json()
    return sorted(f"{k['provider']}/{k['key_id']}" for k in snap["keys"])


def test_sighup_under_load_adds_a_key_and_a_model_and_removes_a_key_without_a_failure(
    emulator: Proc, tmp_path: Path
) -> None:
    path = tmp_path / "router.toml"
    write(path, config_text(emulator.url))
    proc = start(path)
    try:
        assert chat(proc.url, "fresh").status_code == 404
        load = Load(proc.url, "smart")
        try:
            time.sleep(0.5)
            # 1. a key added
            write(path, config_text(emulator.url, ("k1", "k2")))
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(proc, "SIGHUP: config reloaded", 1)
            assert state_keys(proc.url) == ["emu/k1", "emu/k2"]
            time.sleep(0.5)
            # 2. a model added: it answers at once
            write(path, config_text(emulator.url, ("k1", "k2"), ("smart", "fresh")))
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(proc, "SIGHUP: config reloaded", 2)
            fresh = chat(proc.url, "fresh")
            assert fresh.status_code == 200, fresh.text
            assert fresh.json()["model"] == "fresh"
            time.sleep(0.5)
            # 3. a key removed: its in-flight requests finish, new ones go to k2
            write(path, config_text(emulator.url, ("k2",), ("smart", "fresh")))
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(proc, "SIGHUP: config reloaded", 3)
            assert state_keys(proc.url) == ["emu/k2"]
            time.sleep(0.5)
        finally:
            load.stop()
        assert load.failures == []
        assert load.ok > 20
        served = chat(proc.url, "smart")
        assert served.status_code == 200
        assert served.headers.get("x-router-key") in (None, "k2")
    finally:
        log = stop(proc)
    assert "keys added: emu/k2" in log
    assert "models added: fresh" in log
    assert "keys removed: emu/k1" in log


def test_admin_reload_reports_changes_and_a_bad_file_keeps_the_running_config(
    emulator: Proc, tmp_path: Path
) -> None:
    path = tmp_path / "router.toml"
    write(path, config_text(emulator.url))
    proc = start(path)
    reload_url = f"{proc.url}/v1/router/reload"
    try:
        # admin only
        assert httpx.post(reload_url, timeout=5).status_code == 401
        assert httpx.post(reload_url, headers=AUTH, timeout=5).status_code == 401
        assert httpx.get(reload_url, headers=ADMIN_AUTH, timeout=5).status_code == 405
        # a new key, a new model, a new gateway key whose tenant may call only the new model
        bob = "reload-secret-bob-0005"
        write(
            path,
            config_text(
                emulator.url,
                ("k1", "k2"),
                ("smart", "fresh"),
                api_keys=f', {{ id = "bob", secret = "{bob}", models = ["fresh"] }}',
            ),
        )
        r = httpx.post(reload_url, headers=ADMIN_AUTH, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["ok"] is True and body["workers"] == "this one"
        assert body["keys_added"] == ["emu/k2"]
        assert body["keys_kept"] == ["emu/k1"]
        assert body["keys_removed"] == []
        assert body["models_added"] == ["fresh"]
        assert body["models_removed"] == []
        for secret in (*SECRETS, bob):
            assert secret not in r.text
        bob_auth = {"authorization": f"Bearer {bob}"}
        body_fresh = {"model": "fresh", "messages": HELLO}
        answer = httpx.post(
            f"{proc.url}/v1/chat/completions", headers=bob_auth, json=body_fresh, timeout=10
        )
        assert answer.status_code == 200, answer.text
        body_smart = {"model": "smart", "messages": HELLO}
        answer = httpx.post(
            f"{proc.url}/v1/chat/completions", headers=bob_auth, json=body_smart, timeout=10
        )
        assert answer.status_code == 403, answer.text
        models = httpx.get(f"{proc.url}/v1/models", headers=AUTH, timeout=5).json()
        assert sorted(m["id"] for m in models["data"]) == ["fresh", "smart"]
        # invalid files: 400 naming the problem, never a secret; the old config serves on
        write(path, config_text(emulator.url).replace('kind = "openai"', 'kind = "opanai"'))
        r = httpx.post(reload_url, headers=ADMIN_AUTH, timeout=10)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "invalid_config"
        assert error["param"] == "providers[0].kind"
        assert "config reload refused" in error["message"]
        for secret in (*SECRETS, bob):
            assert secret not in r.text
        write(path, config_text(emulator.url).replace("[router]", "[router]\nseed = 3\n"))
        r = httpx.post(reload_url, headers=ADMIN_AUTH, timeout=10)
        assert r.status_code == 400 and r.json()["error"]["param"] == "router.seed", r.text
        write(
            path,
            config_text(emulator.url).replace(f'secret = "{UP1}"', 'secret = "env:RELOAD_NOPE"'),
        )
        r = httpx.post(reload_url, headers=ADMIN_AUTH, timeout=10)
        assert r.status_code == 400 and "RELOAD_NOPE" in r.text, r.text
        # the same through SIGHUP: one clear log line, still serving
        proc.proc.send_signal(signal.SIGHUP)
        wait_for(proc, "SIGHUP: config reload refused", 1)
        assert state_keys(proc.url) == ["emu/k1", "emu/k2"]
        assert chat(proc.url, "fresh").status_code == 200
        answer = httpx.post(
            f"{proc.url}/v1/chat/completions", headers=bob_auth, json=body_fresh, timeout=10
        )
        assert answer.status_code == 200
        # a listen address change is logged, not applied
        text = config_text(emulator.url, ("k1", "k2"), ("smart", "fresh"))
        write(path, text.replace("[gateway]", "[gateway]\nport = 1\ngc_threshold = 777\n"))
        r = httpx.post(reload_url, headers=ADMIN_AUTH, timeout=10)
        assert r.status_code == 200, r.text
        assert httpx.get(f"{proc.url}/healthz", timeout=5).status_code == 200
        # bob's key is gone with the file's new api_keys
        answer = httpx.post(
            f"{proc.url}/v1/chat/completions", headers=bob_auth, json=body_fresh, timeout=10
        )
        assert answer.status_code == 401
    finally:
        log = stop(proc)
    refused = [line for line in log.splitlines() if "reload refused" in line]
    assert len(refused) == 4, refused  # three admin calls, one SIGHUP: a line each
    assert "providers[0].kind" in refused[0]
    assert "listen address changes only on restart" in log
    assert "gateway.gc_threshold changed to 777: it is applied only at startup" in log


def _until(check: Callable[[], bool], proc: Proc, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, proc.stderr()[-3000:]
        time.sleep(0.05)


def test_workers_each_reload_on_sighup_and_the_admin_endpoint_fans_out(
    emulator: Proc, tmp_path: Path
) -> None:
    path = tmp_path / "router.toml"
    write(path, config_text(emulator.url))
    proc = start(path, "--workers", "2")
    try:
        _until(lambda: proc.stderr().count("serving") >= 2, proc)
        load = Load(proc.url, "smart", clients=4)
        try:
            write(path, config_text(emulator.url, ("k1", "k2"), ("smart", "fresh")))
            proc.proc.send_signal(signal.SIGHUP)
            wait_for(proc, "SIGHUP: config reloaded", 2)  # one line per worker
            # Fresh connections spread over both workers: every one serves the new model.
            for _ in range(12):
                r = chat(proc.url, "fresh")
                assert r.status_code == 200, r.text
            # The admin endpoint reaches one worker, which has the supervisor tell all.
            write(path, config_text(emulator.url, ("k1", "k2"), ("smart", "fresh", "third")))
            r = httpx.post(f"{proc.url}/v1/router/reload", headers=ADMIN_AUTH, timeout=10)
            assert r.status_code == 200, r.text
            assert r.json()["workers"] == "all"
            assert r.json()["models_added"] == ["third"]
            # That worker reloads again (nothing changes), the other one once.
            wait_for(proc, "SIGHUP: config reloaded", 4)
            for _ in range(12):
                r = chat(proc.url, "third")
                assert r.status_code == 200, r.text
        finally:
            load.stop()
        assert load.failures == []
        assert load.ok > 10
    finally:
        stop(proc)


def test_a_changed_provider_header_is_a_new_instance_and_the_old_one_closes(
    emulator: Proc,
) -> None:
    """Library over real HTTP: changing a provider's headers replaces its instance; the
    old instance's connections close once its keys drained, the new header is sent, and
    a removed key's connections close while its provider stays."""
    import trio

    from router import ChatRequest, Message, Router, RouterConfig

    def cfg(header: str, keys: tuple[str, ...]) -> RouterConfig:
        text = config_text(emulator.url, keys).replace(
            'kind = "openai"', f'kind = "openai"\nheaders = {{ x-team = "{header}" }}'
        )
        return RouterConfig.from_toml(text)

    async def main() -> None:
        request = ChatRequest(model="smart", messages=[Message("user", "hi")])
        async with Router.open(cfg("red", ("k1", "k2"))) as router:
            old = router.provider("emu")
            await router.submit(request)
            assert old._shards  # type: ignore[attr-defined]
            result = await router.reload(cfg("red", ("k2",)))
            assert result.keys_removed == ["emu/k1"] and result.providers_replaced == []
            await router.submit(request)
            await trio.sleep(0.2)  # nothing in flight: the drain is immediate
            assert not router.draining
            assert set(old._shards) == {"k2"}  # type: ignore[attr-defined]
            result = await router.reload(cfg("blue", ("k2",)))
            assert result.providers_replaced == ["emu"]
            assert result.keys_added == ["emu/k2"] and result.keys_removed == ["emu/k2"]
            assert router.provider("emu") is not old
            response = await router.submit(request)
            assert response.key_id == "k2"
            await trio.sleep(0.2)  # nothing in flight: the drain is immediate
            assert not router.draining
            assert old._shards == {}  # type: ignore[attr-defined]

    httpx.post(f"{emulator.url}/_emulator/reset", timeout=5).raise_for_status()
    trio.run(main)
    calls = httpx.get(f"{emulator.url}/_emulator/calls", timeout=5).json()
    assert [c["headers"].get("x-team") for c in calls] == ["red", "red", "blue"]
    assert [c["key"] for c in calls] == [UP1, UP2, UP2]
