"""Redis that stalls (SIGSTOP: connections are accepted, nothing answers) in the middle
of a load on a router with a shared RPM budget: no request fails, a request waits on
Redis at most about `budget_timeout`, the instance notices the stall and Redis's return
in time, and logs each once. A real redis-server on a free loopback port, real clock."""

from __future__ import annotations

import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from scripted import Reply, ScriptedProvider
from test_shared import RedisServer

from router import ChatRequest, Message, Router, RouterConfig

STALL = 2.0
AFTER = 2.0
PROVIDER_LATENCY = 0.005
WORKERS = 8


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signal.SIGCONT)  # never leave it stopped
        server.stop()


def _config(port: int, prefix: str) -> RouterConfig:
    return RouterConfig.from_toml(f"""
[router]
timeout = 5.0
transient_retries = 0
[router.shared]
redis_url = "redis://127.0.0.1:{port}/0"
key_prefix = "{prefix}"
timeout = 0.3
budget_timeout = 0.1
ping_interval = 0.1
[[providers]]
name = "c"
kind = "custom"
keys = [{{ id = "k1", rpm = 1000000 }}]
""")


async def test_redis_stall_under_load_fails_no_request(
    redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="router.shared")
    assert redis.proc is not None
    proc = redis.proc
    provider = ScriptedProvider(default=Reply(latency=PROVIDER_LATENCY))
    request = ChatRequest(model="c/m", messages=[Message(role="user", content="hi")])
    # (start, latency, error) per request, on the real trio clock
    results: list[tuple[float, float, BaseException | None]] = []
    flips: list[tuple[float, bool]] = []  # (when, reachable) as the snapshot shows it

    async with Router.open(
        _config(redis.port, f"stall-{tmp_path.name}"), providers={"c": provider}
    ) as router:
        shared = router.snapshot().shared
        assert shared is not None and shared.reachable

        def reachable() -> bool:
            snap = router.snapshot().shared
            assert snap is not None
            return snap.reachable

        async def load() -> None:
            while True:
                start = trio.current_time()
                error: BaseException | None = None
                try:
                    await router.submit(request)
                except Exception as exc:
                    error = exc
                results.append((start, trio.current_time() - start, error))
                await trio.sleep(0.002)

        async def watch() -> None:
            last = True
            while True:
                now = reachable()
                if now != last:
                    flips.append((trio.current_time(), now))
                    last = now
                await trio.sleep(0.01)

        stopped = resumed = 0.0
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                for _ in range(WORKERS):
                    nursery.start_soon(load)
                await trio.sleep(0.5)
                assert router.snapshot().keys[0].budget_source == "shared"
                proc.send_signal(signal.SIGSTOP)
                stopped = trio.current_time()
                await trio.sleep(STALL)
                proc.send_signal(signal.SIGCONT)
                resumed = trio.current_time()
                await trio.sleep(AFTER)
                nursery.cancel_scope.cancel()
        finally:
            proc.send_signal(signal.SIGCONT)
        final = router.snapshot()

    failed = [r for r in results if r[2] is not None]
    assert not failed, f"{len(failed)} of {len(results)} failed: {failed[:3]}"
    during = [lat for start, lat, _ in results if stopped <= start < resumed]
    after = [lat for start, lat, _ in results if start >= resumed]
    assert len(during) > 50 and len(after) > 50, (len(during), len(after))
    worst = max(lat for _, lat, _ in results)
    during.sort()
    p99 = during[int(len(during) * 0.99)]
    print(
        f"\n{len(results)} requests, {len(during)} during the stall: "
        f"p99 {p99 * 1000:.0f} ms, max {worst * 1000:.0f} ms; flips "
        f"{[(round(t - stopped, 3), r) for t, r in flips]}"
    )
    assert worst < 1.0
    assert p99 < 0.3  # budget_timeout (0.1) plus generous slack
    # Unreachable within about ping_interval + timeout of the stall, back within ~2 s.
    assert [r for _, r in flips] == [False, True], flips
    assert flips[0][0] - stopped < 1.0
    assert flips[1][0] - resumed < 2.0
    assert final.shared is not None and final.shared.reachable
    assert final.shared.budget_fallbacks > 0
    assert final.keys[0].budget_source == "shared"
    messages = [r.getMessage() for r in caplog.records if r.name == "router.shared"]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable: router state is shared" in m for m in messages) == 2, messages
