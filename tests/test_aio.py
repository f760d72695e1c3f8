"""AsyncioRouter: the trio router in guest mode on an asyncio loop.

Every test is a plain sync function that calls `asyncio.run`, so pytest-trio (trio_mode)
leaves it alone. Providers run on the trio side, so they use trio.sleep.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio
from fastapi import FastAPI
from scripted import Fail, Hang, Reply, StreamingScriptedProvider, StreamScript, make_config

from router import (
    ApiKey,
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    ConfigError,
    Message,
    ProviderError,
    RouterClosedError,
    RouterConfig,
    StreamInterruptedError,
    UnknownModelError,
)
from router.aio import AsyncioRouter

CONFIG = """
[router]
timeout = 30.0
[[providers]]
name = "p"
kind = "custom"
max_concurrency = 1000
keys = [{ id = "k1" }]
[[models]]
name = "m"
provider = "p"
upstream = "u"
"""


def request(model: str = "m") -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hello")])


def run(
    body: Callable[[AsyncioRouter, StreamingScriptedProvider], Awaitable[None]],
) -> StreamingScriptedProvider:
    provider = StreamingScriptedProvider()

    async def main() -> None:
        async with AsyncioRouter.open(make_config(CONFIG), providers={"p": provider}) as router:
            await body(router, provider)
        assert asyncio.all_tasks() == {asyncio.current_task()}  # nothing left running

    asyncio.run(main())
    return provider


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 - polling router state is the point
            await asyncio.sleep(0.001)


def test_submit_from_asyncio() -> None:
    async def body(router: AsyncioRouter, provider: StreamingScriptedProvider) -> None:
        response = await router.submit(request())
        assert response.content == "ok from k1"
        assert (response.model, response.provider, response.key_id) == ("m", "p", "k1")
        assert [a.outcome for a in response.attempts] == ["ok"]
        snap = router.snapshot()
        assert snap.keys[0].successes == 1
        assert router.callable_keys() == 1
        router.reset(provider="p", key_id="k1")

    run(body)


def test_stream_from_asyncio() -> None:
    async def body(router: AsyncioRouter, provider: StreamingScriptedProvider) -> None:
        provider.script("k1", [StreamScript(pieces=("hel", "lo ", "world"), interval=0.001)])
        texts = []
        async with router.stream(request()) as stream:
            async for chunk in stream:
                texts.append(chunk.text)
            assert stream.text == "hello world"
            assert stream.finish_reason == "stop"
            assert stream.usage is not None and stream.usage.total_tokens == 2
            assert (stream.model, stream.provider, stream.key_id) == ("m", "p", "k1")
            async for _ in stream:  # ended: stays ended
                raise AssertionError
        assert "".join(texts) == "hello world"
        assert provider.closed == ["k1"]

    run(body)


def test_errors_keep_their_type() -> None:
    async def body(router: AsyncioRouter, provider: StreamingScriptedProvider) -> None:
        provider.script("k1", [Fail("bad_request", status=400)])
        with pytest.raises(ProviderError) as info:
            await router.submit(request())
        assert info.value.kind == "bad_request" and info.value.status == 400
        with pytest.raises(UnknownModelError):
            await router.submit(request("nope"))
        provider.script("k1", [Fail("auth", status=401)])
        with pytest.raises(ChainExhaustedError):
            await router.submit(request())
        router.reset()
        provider.script("k1", [Fail("bad_request")])
        with pytest.raises(ProviderError):
            async with router.stream(request()):
                raise AssertionError("the stream should not open")
        provider.script("k1", [StreamScript(pieces=("a", "b"), ending="cut")])
        with pytest.raises(StreamInterruptedError):
            async with router.stream(request()) as stream:
                async for _ in stream:
                    pass
        assert stream.text == "ab"

    run(body)


def test_open_errors_and_closed_router() -> None:
    async def main() -> None:
        with pytest.raises(ConfigError):
            async with AsyncioRouter.open(RouterConfig.from_toml(CONFIG)):  # no provider given
                raise AssertionError
        provider = StreamingScriptedProvider()
        async with AsyncioRouter.open(make_config(CONFIG), providers={"p": provider}) as router:
            pass
        with pytest.raises(RouterClosedError):
            await router.submit(request())
        with pytest.raises(RouterClosedError):
            router.snapshot()

    asyncio.run(main())


class SleepyProvider:
    """Sleeps (on the trio side) before answering; records how each call ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        try:
            await trio.sleep(10)
        except trio.Cancelled:
            self.ended.append("cancelled")
            raise
        self.ended.append("answered")
        return ChatResponse(content="late")


def test_cancelled_asyncio_task_cancels_the_trio_request() -> None:
    provider = SleepyProvider()

    async def main() -> None:
        async with AsyncioRouter.open(make_config(CONFIG), providers={"p": provider}) as router:
            task = asyncio.create_task(router.submit(request()))
            await wait_until(lambda: router.snapshot().keys[0].in_flight == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await wait_until(lambda: provider.ended == ["cancelled"])
            await wait_until(lambda: router.snapshot().keys[0].in_flight == 0)
            key = router.snapshot().keys[0]
            assert key.failures == 0 and key.breaker == "closed" and key.cooling_for == 0
            assert router.callable_keys() == 1
            # A timeout on the asyncio side is a cancellation too.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await router.submit(request())
            await wait_until(lambda: provider.ended == ["cancelled"] * 2)
            await wait_until(lambda: router.snapshot().keys[0].in_flight == 0)
            assert router.snapshot().keys[0].failures == 0

    asyncio.run(main())


def test_cancelled_stream_consumer_closes_the_upstream() -> None:
    async def body(router: AsyncioRouter, provider: StreamingScriptedProvider) -> None:
        provider.script("k1", [StreamScript(pieces=("a", "b"), ending="stall")])
        got: list[str] = []

        async def consume() -> None:
            async with router.stream(request()) as stream:
                async for chunk in stream:
                    got.append(chunk.text)

        task = asyncio.create_task(consume())
        await wait_until(lambda: got == ["a", "b"])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: provider.closed == ["k1"])
        await wait_until(lambda: router.snapshot().keys[0].in_flight == 0)
        assert router.snapshot().keys[0].failures == 0

    run(body)


def test_shutdown_with_requests_in_flight() -> None:
    async def main() -> None:
        provider = StreamingScriptedProvider(default=Hang())
        async with AsyncioRouter.open(make_config(CONFIG), providers={"p": provider}) as router:
            tasks = [asyncio.create_task(router.submit(request())) for _ in range(5)]
            await wait_until(lambda: len(provider.calls) == 5)
        for task in tasks:
            with pytest.raises(RouterClosedError):
                await task
        with pytest.raises(RuntimeError):
            trio.lowlevel.current_trio_token()  # the guest run is over
        assert asyncio.all_tasks() == {asyncio.current_task()}

    asyncio.run(main())


def test_error_in_the_block_propagates_and_closes() -> None:
    async def main() -> None:
        provider = StreamingScriptedProvider()
        with pytest.raises(KeyError):
            async with AsyncioRouter.open(make_config(CONFIG), providers={"p": provider}):
                raise KeyError("mine")
        with pytest.raises(RuntimeError):
            trio.lowlevel.current_trio_token()

    asyncio.run(main())


def test_fastapi_app_with_200_concurrent_requests() -> None:
    provider = StreamingScriptedProvider(default=Reply(latency=0.02))

    async def main() -> None:
        async with AsyncioRouter.open(make_config(CONFIG), providers={"p": provider}) as router:
            app = FastAPI()
            peak = waiting = 0

            @app.get("/ask/{n}")
            async def ask(n: int) -> dict[str, str]:
                nonlocal peak, waiting
                waiting += 1
                peak = max(peak, waiting)
                try:
                    response = await router.submit(request())
                finally:
                    waiting -= 1
                return {"n": str(n), "content": response.content}

            @app.get("/stream")
            async def stream() -> dict[str, str]:
                async with router.stream(request()) as s:
                    async for _ in s:
                        pass
                    return {"text": s.text}

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
                replies = await asyncio.gather(*(client.get(f"/ask/{n}") for n in range(200)))
                assert [r.status_code for r in replies] == [200] * 200
                assert [r.json()["n"] for r in replies] == [str(n) for n in range(200)]
                assert {r.json()["content"] for r in replies} == {"ok from k1"}
                provider.script("k1", [StreamScript(pieces=("x", "y"))])
                assert (await client.get("/stream")).json() == {"text": "xy"}
            key = router.snapshot().keys[0]
            assert key.successes == 201 and key.failures == 0
            assert peak > 100  # the requests really overlapped

    asyncio.run(main())


def test_reload_from_asyncio() -> None:
    async def body(router: AsyncioRouter, provider: StreamingScriptedProvider) -> None:
        assert (await router.submit(request())).key_id == "k1"
        two_keys = CONFIG.replace('keys = [{ id = "k1" }]', 'keys = [{ id = "k1" }, { id = "k2" }]')
        result = await router.reload(make_config(two_keys))
        assert result.keys_added == ["p/k2"] and result.keys_kept == ["p/k1"]
        assert [k.key_id for k in router.snapshot().keys] == ["k1", "k2"]
        with pytest.raises(ConfigError) as err:
            await router.reload(make_config(two_keys.replace("[router]", "[router]\nseed = 1")))
        assert err.value.field == "router.seed"
        assert (await router.submit(request())).key_id == "k1"

    run(body)
