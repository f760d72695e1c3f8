"""Shared state through Redis, end to end: several `llm-router serve` processes behind
one real redis-server (started here on a free loopback port, never a system service),
with the provider emulator in another process behind them.

Real time, real sockets, short timeouts. Every process is ended in fixture teardown.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from test_gateway import Proc

ADMIN = "shared-admin-secret-0001"
UP_K1 = "sk-shared-one-111"
UP_K2 = "sk-shared-two-222"
UP_M1 = "sk-shared-metered-333"
UP_B1 = "sk-shared-bulk-444"
RPM = 4
HELLO = [{"role": "user", "content": "hello shared"}]


class RedisServer:
    """A redis-server of the test's own on a free loopback port; stop() and start()
    keep the port."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None, "redis-server is not installed (.ci/run installs it)"
        self.binary = binary
        self.workdir = workdir
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


def _config(emulator_url: str, redis_port: int, prefix: str) -> str:
    return f"""
[router]
timeout = 5.0
attempt_timeout = 2.0
transient_retries = 0
retry_backoff = [0.01]
retry_jitter = 0.0

[router.breaker]
failure_threshold = 1
minimum_calls = 1000
window = 1000
open_for = 30.0
jitter = 0.0

[router.shared]
redis_url = "redis://127.0.0.1:{redis_port}/0"
key_prefix = "{prefix}"
timeout = 0.3
budget_timeout = 0.5
ping_interval = 0.1

[gateway]
admin_key = "{ADMIN}"

[[providers]]
name = "emu"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "k1", secret = "{UP_K1}" }}, {{ id = "k2", secret = "{UP_K2}" }}]

[[providers]]
name = "metered"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "m1", secret = "{UP_M1}", rpm = {RPM} }}]

[[providers]]
name = "bulk"
kind = "openai"
base_url = "{emulator_url}/v1"
keys = [{{ id = "b1", secret = "{UP_B1}", rpm = 100000 }}]

[[models]]
name = "smart"
provider = "emu"
upstream = "gpt-main"
fallbacks = ["emu/gpt-backup"]

[[models]]
name = "counted"
provider = "metered"
upstream = "gpt-metered"

[[models]]
name = "bulk"
provider = "bulk"
upstream = "gpt-bulk"
"""


def _start(config: Path, *extra: str) -> Proc:
    return Proc(
        ["-m", "router", "serve", "--config", str(config), "--port", "0", *extra], "listening on"
    )


def _stop(proc: Proc) -> int | None:
    """SIGTERM (a graceful drain), then make sure; returns the exit status of the drain."""
    code = None
    if proc.proc.poll() is None:
        proc.proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = proc.proc.wait(timeout=10)
    proc.kill()
    return code


@pytest.fixture(scope="module")
def config_path(
    emulator: Proc, redis: RedisServer, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("shared") / "router.toml"
    path.write_text(_config(emulator.url, redis.port, f"test-{uuid.uuid4().hex[:8]}"))
    return path


@pytest.fixture(scope="module")
def trio_of(config_path: Path) -> Iterator[list[Proc]]:
    """Three router instances (processes) behind one Redis."""
    procs: list[Proc] = []
    try:
        for _ in range(3):
            procs.append(_start(config_path))
        yield procs
    finally:
        codes = [_stop(p) for p in procs]
        assert codes == [0] * len(procs), [p.stderr() for p in procs]


def state(proc: Proc | str) -> dict[str, Any]:
    url = proc if isinstance(proc, str) else proc.url
    r = httpx.get(f"{url}/v1/router/state", headers={"authorization": f"Bearer {ADMIN}"}, timeout=5)
    r.raise_for_status()
    data: dict[str, Any] = r.json()
    return data


def key(st: dict[str, Any], provider: str, key_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(
        k for k in st["keys"] if k["provider"] == provider and k["key_id"] == key_id
    )
    return found


def lane(st: dict[str, Any], provider: str, key_id: str, upstream: str) -> dict[str, Any] | None:
    """The lane of `upstream` on the key, if the instance has one."""
    lanes: list[dict[str, Any]] = key(st, provider, key_id)["lanes"]
    return next((x for x in lanes if x["model"] == upstream), None)


def lane_cooling(st: dict[str, Any], key_id: str, upstream: str = "gpt-main") -> float:
    found = lane(st, "emu", key_id, upstream)
    return 0.0 if found is None else float(found["cooling_for"])


def model(st: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((m for m in st["models"] if m["name"] == name), None)


def wait_for(check: Callable[[], bool], timeout: float) -> float:
    """Poll `check` until true; returns the seconds it took (fails after `timeout`)."""
    start = time.monotonic()
    while True:
        if check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s")
        time.sleep(0.02)


def chat(proc: Proc, model_name: str = "smart", **body: Any) -> httpx.Response:
    return httpx.post(
        f"{proc.url}/v1/chat/completions",
        json={"model": model_name, "messages": HELLO, **body},
        timeout=10,
    )


def script(
    emulator: Proc, faults: list[dict[str, Any]], key: str | None = None, model: str | None = None
) -> None:
    httpx.post(
        f"{emulator.url}/_emulator/script",
        json={"key": key, "model": model, "faults": faults},
        timeout=5,
    ).raise_for_status()


def calls(emulator: Proc) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = httpx.get(f"{emulator.url}/_emulator/calls", timeout=5).json()
    return result


def _clean(st: dict[str, Any]) -> bool:
    return all(
        x["breaker"] == "closed" and x["cooling_for"] == 0
        for k in st["keys"]
        if k["provider"] == "emu"
        for x in (k, *k["lanes"])
    ) and all(m["health"] == "healthy" for m in st["models"])


@pytest.fixture
def routers(trio_of: list[Proc], emulator: Proc) -> Iterator[list[Proc]]:
    """The three instances, reset (through one of them: the reset spreads) before and
    after each test."""

    def reset() -> None:
        httpx.post(f"{emulator.url}/_emulator/reset", timeout=5).raise_for_status()
        httpx.post(
            f"{trio_of[0].url}/v1/router/reset",
            headers={"authorization": f"Bearer {ADMIN}"},
            json={},
            timeout=5,
        ).raise_for_status()
        wait_for(lambda: all(_clean(state(p)) for p in trio_of), 3.0)

    reset()
    yield trio_of
    reset()


# --------------------------------------------------------------------------- the tests


def test_rate_limit_on_one_cools_the_lane_on_the_others(
    routers: list[Proc], emulator: Proc
) -> None:
    a, b, c = routers
    assert all(state(p)["shared"]["reachable"] for p in routers)
    ids = {state(p)["shared"]["instance"] for p in routers}
    assert len(ids) == 3
    script(emulator, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K1)
    r = chat(a)
    assert r.status_code == 200, r.text
    assert r.headers["x-router-key-id"] == "k2"
    took = wait_for(lambda: all(lane_cooling(state(p), "k1") > 25 for p in (b, c)), 1.0)
    assert took < 1.0
    for p in (b, c):
        st = state(p)
        k1 = lane(st, "emu", "k1", "gpt-main")
        assert k1 is not None and k1["cooling_source"] == "shared"
        assert key(st, "emu", "k1")["cooling_for"] == 0  # the key itself is not cooling
    k1 = lane(state(a), "emu", "k1", "gpt-main")
    assert k1 is not None and k1["cooling_source"] == "local"
    # The others do not call the key for that model, but still for another one.
    before = len(calls(emulator))
    for p in (b, c):
        r = chat(p)
        assert r.status_code == 200 and r.headers["x-router-key-id"] == "k2"
        r = chat(p, "emu/gpt-other")
        assert r.status_code == 200 and r.headers["x-router-key-id"] == "k1"
    sent = [(call["key"], call["model"]) for call in calls(emulator)[before:]]
    assert sent == [(UP_K2, "gpt-main"), (UP_K1, "gpt-other")] * 2


def test_breaker_and_model_health_opened_on_one_hold_on_the_others(
    routers: list[Proc], emulator: Proc
) -> None:
    a, b, c = routers
    script(emulator, [{"status": 503}], key=UP_K1, model="gpt-main")
    r = chat(b)  # k1's gpt-main fails (its lane's breaker opens at once), the fallback
    assert r.status_code == 200, r.text  # model answers on k1
    assert r.headers["x-router-key-id"] == "k1"

    def k1_main(p: Proc) -> dict[str, Any]:
        found = lane(state(p), "emu", "k1", "gpt-main")
        assert found is not None
        return found

    assert k1_main(b)["breaker"] == "open"
    wait_for(lambda: all(k1_main(p)["breaker"] == "open" for p in (a, c)), 1.0)
    for p in (a, c):
        k1 = k1_main(p)
        assert k1["breaker_source"] == "shared"
        assert 25 < k1["breaker_open_for"] <= 30
        assert key(state(p), "emu", "k1")["breaker"] == "closed"  # the key itself is fine
        r = chat(p)
        assert r.status_code == 200 and r.headers["x-router-key-id"] == "k2"
        assert r.headers["x-router-attempts"] == "1"  # k1 not even tried for gpt-main
    # A model the provider says does not exist is disabled everywhere.
    script(emulator, [{"status": 404, "error": "model_not_found"}])
    r = chat(a, "emu/gpt-gone", fallbacks=["smart"])
    assert r.status_code == 200, r.text

    def disabled_everywhere() -> bool:
        found = [model(state(p), "emu/gpt-gone") for p in (b, c)]
        return all(m is not None and m["health"] == "disabled" for m in found)

    wait_for(disabled_everywhere, 1.0)
    gone = model(state(c), "emu/gpt-gone")
    assert gone is not None and gone["source"] == "shared"


def test_shared_rpm_budget_admits_at_most_n_across_instances(
    routers: list[Proc], emulator: Proc
) -> None:
    statuses = [chat(routers[i % 3], "counted").status_code for i in range(3 * RPM)]
    assert statuses.count(200) == RPM, statuses
    assert all(s in (429, 503) for s in statuses if s != 200), statuses
    assert sum(1 for call in calls(emulator) if call["key"] == UP_M1) == RPM
    for p in routers:
        m1 = key(state(p), "metered", "m1")
        assert m1["budget_source"] == "shared"
        assert state(p)["shared"]["budget_fallbacks"] == 0


def test_redis_outage_under_load_fails_no_request_then_resyncs(
    routers: list[Proc], emulator: Proc, redis: RedisServer
) -> None:
    results: list[tuple[str, int]] = []
    stop = threading.Event()

    def load(n: int) -> None:
        with httpx.Client(timeout=10) as client:
            i = 0
            while not stop.is_set():
                proc = routers[(n + i) % 3]
                name = "smart" if i % 2 else "bulk"
                r = client.post(
                    f"{proc.url}/v1/chat/completions", json={"model": name, "messages": HELLO}
                )
                results.append((name, r.status_code))
                i += 1

    threads = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.4)
        redis.stop()
        stopped = time.monotonic()
        wait_for(lambda: not any(state(p)["shared"]["reachable"] for p in routers), 1.5)
        assert time.monotonic() - stopped < 1.5
        for p in routers:
            st = state(p)
            assert key(st, "bulk", "b1")["budget_source"] == "local"
        time.sleep(0.5)
        served_during = len(results)
        redis.start()
        wait_for(lambda: all(state(p)["shared"]["reachable"] for p in routers), 3.0)
        time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=10)
    assert served_during > 10
    failed = [r for r in results if r[1] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:5]}"
    for p in routers:  # the outage was logged once per instance, and the return too
        log = p.stderr()
        assert log.count("unreachable") == 1, log
        assert log.count("reachable: router state is shared") == 2, log
    # Sharing again: a 429 on one cools the lane on the others.
    a, b, c = routers
    script(emulator, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K1)
    assert chat(a).status_code == 200
    wait_for(lambda: all(lane_cooling(state(p), "k1") > 25 for p in (b, c)), 1.0)


def test_late_instance_learns_existing_cooldowns(
    routers: list[Proc], emulator: Proc, config_path: Path
) -> None:
    a, b, _ = routers
    script(emulator, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K2)
    script(emulator, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K1)
    r = chat(a)  # gpt-main is rate-limited on both keys; gpt-backup answers on k1
    assert r.status_code == 200 and r.headers["x-router-key-id"] == "k1", r.text
    wait_for(lambda: lane_cooling(state(b), "k2") > 25, 1.0)
    late = _start(config_path)
    try:
        st = state(late)  # the first look, right after it listens
        assert st["shared"]["reachable"]
        for key_id in ("k1", "k2"):
            found = lane(st, "emu", key_id, "gpt-main")
            assert found is not None and found["cooling_for"] > 25, found
            assert found["cooling_source"] == "shared"
            assert key(st, "emu", key_id)["cooling_for"] == 0
        before = len(calls(emulator))
        r = chat(late)  # gpt-main cools on every key: only the fallback is called
        assert r.status_code == 200 and r.headers["x-router-model"] == "emu/gpt-backup", r.text
        assert [(c["key"], c["model"]) for c in calls(emulator)[before:]] == [(UP_K1, "gpt-backup")]
    finally:
        _stop(late)


def test_serve_workers_share_one_port_and_state(
    emulator: Proc, redis: RedisServer, tmp_path: Path
) -> None:
    config = tmp_path / "router.toml"
    config.write_text(_config(emulator.url, redis.port, f"workers-{uuid.uuid4().hex[:8]}"))
    parent = _start(config, "--workers", "2")
    try:
        seen: dict[str, str] = {}  # instance id -> url it answered on
        deadline = time.monotonic() + 15
        while len(seen) < 2 and time.monotonic() < deadline:
            try:
                seen[state(parent)["shared"]["instance"]] = parent.url
            except httpx.HTTPError:
                time.sleep(0.05)
        assert len(seen) == 2, "both workers answer on the one port"
        script(emulator, [{"status": 429, "headers": {"retry-after": "30"}}], key=UP_K1)
        assert chat(parent).status_code == 200
        sources: dict[str, str] = {}

        def both_cooling() -> bool:
            st = state(parent)
            k1 = lane(st, "emu", "k1", "gpt-main")
            if k1 is not None and k1["cooling_for"] > 25:
                sources[st["shared"]["instance"]] = k1["cooling_source"]
            return len(sources) == 2

        wait_for(both_cooling, 10.0)
        assert sorted(sources.values()) == ["local", "shared"]
        pid = parent.proc.pid
        os.kill(pid, signal.SIGTERM)
        assert parent.proc.wait(timeout=15) == 0
    finally:
        _stop(parent)
