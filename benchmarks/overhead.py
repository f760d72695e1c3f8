"""In-process routing overhead per request: `router.submit` against an instant custom
provider, minus the direct `provider.complete` call, at 1 and 1,000 concurrent callers.

    .venv/bin/python benchmarks/overhead.py [--requests 200000] [--repeat 5]

The same figure for asyncio callers: `AsyncioRouter.submit` (the trio router in guest
mode on the asyncio loop, `router.aio`) from asyncio tasks, against the same provider
awaited directly from asyncio; the bridge's cost is its time minus trio's
`router.submit`. Guest mode waits for I/O in a helper thread that `time.thread_time`
does not see; with an instant provider that thread only wakes for the hand-offs.

No network and no sleeping: what is measured is the router's own cost (chain, key
choice, the actor hop, breaker and cooldown bookkeeping, the attempt record). Time is
the CPU time of the one thread trio runs on (`time.thread_time`), and each figure is
the best of `--repeat` runs, to keep a shared machine's noise out. Writes
`benchmarks/results/overhead.json` and `.md`.

`--tracing` also measures `router.submit` with OpenTelemetry tracing on (the SDK's
provider, a batch processor and an exporter that drops the spans: the spans' cost on
the event loop's thread, not the export's) and prints it; tracing off costs one
attribute check per request, which the figures above already include.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from router import ApiKey, ChatRequest, ChatResponse, Message, Router, RouterConfig
from router.aio import AsyncioRouter

RESULTS = Path(__file__).resolve().parent / "results"

CONFIG = """
[router]
seed = 1
[[providers]]
name = "instant"
kind = "custom"
max_concurrency = 100000
keys = [{ id = "k1" }, { id = "k2" }]
[[models]]
name = "m"
provider = "instant"
upstream = "upstream-m"
"""


class InstantProvider:
    """Answers at once, without a checkpoint: the cheapest possible upstream."""

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        return ChatResponse(content="ok")


async def _drive(call: Callable[[], Awaitable[object]], callers: int, total: int) -> float:
    per_caller = total // callers

    async def caller() -> None:
        for _ in range(per_caller):
            await call()

    start = time.thread_time()
    if callers == 1:
        await caller()
    else:
        async with trio.open_nursery() as nursery:
            for _ in range(callers):
                nursery.start_soon(caller)
    return (time.thread_time() - start) / (per_caller * callers)


async def measure(
    callers: int, total: int, repeat: int, tracer_provider: Any = None
) -> dict[str, float]:
    provider = InstantProvider()
    config = RouterConfig.from_toml(CONFIG)
    request = ChatRequest(model="m", messages=[Message(role="user", content="hello")])
    key = ApiKey("instant", "k1", "")
    direct_best = routed_best = float("inf")
    opening = Router.open(config, providers={"instant": provider}, tracer_provider=tracer_provider)
    async with opening as router:

        async def direct() -> object:
            return await provider.complete(request, key)

        async def routed() -> object:
            return await router.submit(request)

        await _drive(routed, callers, min(total, 10_000))  # warm up
        for _ in range(repeat):
            direct_best = min(direct_best, await _drive(direct, callers, total))
            routed_best = min(routed_best, await _drive(routed, callers, total))
    return {
        "callers": callers,
        "requests": total,
        "direct_us": direct_best * 1e6,
        "routed_us": routed_best * 1e6,
        "overhead_us": (routed_best - direct_best) * 1e6,
    }


async def _drive_asyncio(call: Callable[[], Awaitable[object]], callers: int, total: int) -> float:
    per_caller = total // callers

    async def caller() -> None:
        for _ in range(per_caller):
            await call()

    start = time.thread_time()
    if callers == 1:
        await caller()
    else:
        async with asyncio.TaskGroup() as group:
            for _ in range(callers):
                group.create_task(caller())
    return (time.thread_time() - start) / (per_caller * callers)


async def measure_asyncio(callers: int, total: int, repeat: int) -> dict[str, float]:
    provider = InstantProvider()
    config = RouterConfig.from_toml(CONFIG)
    request = ChatRequest(model="m", messages=[Message(role="user", content="hello")])
    key = ApiKey("instant", "k1", "")
    direct_best = bridged_best = float("inf")
    async with AsyncioRouter.open(config, providers={"instant": provider}) as router:

        async def direct() -> object:
            return await provider.complete(request, key)

        async def bridged() -> object:
            return await router.submit(request)

        await _drive_asyncio(bridged, callers, min(total, 10_000))  # warm up
        for _ in range(repeat):
            direct_best = min(direct_best, await _drive_asyncio(direct, callers, total))
            bridged_best = min(bridged_best, await _drive_asyncio(bridged, callers, total))
    return {"asyncio_direct_us": direct_best * 1e6, "asyncio_us": bridged_best * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--tracing", action="store_true", help="also measure tracing on")
    args = parser.parse_args()
    rows = []
    for callers in (1, 1000):
        row = trio.run(measure, callers, args.requests, args.repeat)
        row.update(asyncio.run(measure_asyncio(callers, args.requests, args.repeat)))
        row["bridge_us"] = row["asyncio_us"] - row["routed_us"]
        rows.append(row)
        print(
            f"callers={callers:5d}  direct {row['direct_us']:6.2f} us  "
            f"routed {row['routed_us']:6.2f} us  overhead {row['overhead_us']:6.2f} us/request  "
            f"asyncio {row['asyncio_us']:6.2f} us  bridge +{row['bridge_us']:6.2f} us/request"
        )
        if args.tracing:
            traced = trio.run(measure, callers, args.requests, args.repeat, _tracer_provider())
            print(
                f"callers={callers:5d}  traced {traced['routed_us']:6.2f} us  "
                f"tracing +{traced['routed_us'] - row['routed_us']:6.2f} us/request"
            )
    RESULTS.mkdir(exist_ok=True)
    meta = {
        "python": platform.python_version(),
        "trio": trio.__version__,
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
        "date": time.strftime("%Y-%m-%d"),
    }
    (RESULTS / "overhead.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [
        "# Routing overhead (in-process, instant provider)",
        "",
        f"Python {meta['python']}, trio {meta['trio']}, {meta['date']}; best of "
        f"{args.repeat} runs of {args.requests} requests.",
        "",
        "| concurrent callers | direct call (µs) | router.submit (µs) | overhead (µs/request) "
        "| AsyncioRouter.submit (µs) | asyncio bridge (µs/request) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['callers']} | {r['direct_us']:.2f} | {r['routed_us']:.2f} | "
            f"{r['overhead_us']:.2f} | {r['asyncio_us']:.2f} | {r['bridge_us']:.2f} |"
        )
    lines += [
        "",
        "asyncio bridge: `router.aio.AsyncioRouter.submit` from asyncio tasks (trio in guest",
        "mode on the asyncio loop) minus trio's `router.submit`, main-thread CPU time.",
    ]
    (RESULTS / "overhead.md").write_text("\n".join(lines) + "\n")


def _tracer_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

    class Dropped(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(Dropped(), max_queue_size=65536))
    return provider


if __name__ == "__main__":
    main()
