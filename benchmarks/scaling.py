"""How the router's cost grows, and what failover costs.

    .venv/bin/python benchmarks/scaling.py                       # about three minutes
    .venv/bin/python benchmarks/scaling.py --sections dispatch inflight
    .venv/bin/python benchmarks/scaling.py --sections gateway_overhead   # about a minute

Sections:

- ``dispatch``: CPU µs per `router.submit` (trio thread time, best of `--repeat`) with 1,
  10, 100 and 1,000 key actors behind one model (instant custom provider, in-process,
  `--callers` concurrent callers), for ``ordered`` and ``round_robin`` balancing.
- ``inflight``: 100 to 10,000 requests in flight at once against a custom provider that
  sleeps 1 s on the real clock: throughput, latency, and memory per in-flight request
  (tracemalloc, taken while every request is parked upstream), minus the same wave of
  direct `provider.complete` calls for the router's own share.
- ``stream``: streamed chunks relayed per second through `router.stream` (in-process)
  and through the gateway (`llm-router serve`, HTTP load generator in its own process),
  against nginx serving a fixed 100-chunk OpenAI stream.
- ``failover``: the emulator (`python -m router.emulator`) with 20 ms upstream latency:
  a healthy baseline, one of two keys failing 30% of the time (503), and a primary
  provider that is down (connection refused); success rate and the added latency.
- ``streams``: many concurrent token-by-token streams (`--stream-counts`, default 100,
  1,000, 1,200 and 3,000) of `--stream-events` events paced `--stream-interval` apart,
  one event per upstream write, from the minimal upstream of `_paced.py`; read by bare
  trio (the floor), through `router.stream` in-process (with CPython's default GC and
  with `router.tune_gc()`), through the gateway and through LiteLLM's proxy (its own
  venv). Reports
  streams completed, CPU µs per relayed event of the process under test, RSS per open
  stream, time to first event, the largest gap between two events, and connections
  opened per stream (plus sequential streams on one key: connections reused).
- ``gateway_overhead``: the gateway's own overhead (``x-router-overhead-ms``) when its
  process is not CPU-saturated: `python -m router serve` in front of the emulator
  answering every request after 0.5 s, so 64 concurrent requests need only ~128 req/s;
  the HTTP load generator (own process) drives 1, 64 and 256 concurrent callers for
  ~15 s each. Reports overhead p50/p90/p99, the gateway's CPU share, req/s.

Writes benchmarks/results/scaling.{json,md} and scaling_inflight.png, scaling_stream.png.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _common as c
import trio

from router import (
    ApiKey,
    ChatRequest,
    ChatResponse,
    Message,
    Router,
    RouterConfig,
    StreamInterruptedError,
    tune_gc,
)

SECTIONS = (
    "dispatch",
    "inflight",
    "stream",
    "failover",
    "gateway_overhead",
    "hedging",
    "continuation",
    "streams",
)
REQUEST = ChatRequest(model="m", messages=[Message("user", "Say hello.")])
PACED = c.BENCH / "_paced.py"
HTTP_MODES = {"raw": "raw httpx", "router": "router.submit"}


def custom_config(keys: int, per_key: int, balancing: str) -> RouterConfig:
    key_list = ", ".join(f'{{ id = "k{i}" }}' for i in range(keys))
    return RouterConfig.from_toml(f"""
[router]
balancing = "{balancing}"
timeout = 120.0
attempt_timeout = 60.0
[[providers]]
name = "p"
kind = "custom"
max_concurrency = {per_key}
keys = [{key_list}]
[[models]]
name = "m"
provider = "p"
upstream = "u"
""")


class Instant:
    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        return ChatResponse(content="ok")


class Sleeper:
    """An upstream that answers after `delay` seconds of the real clock."""

    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        await trio.sleep(self.delay)
        return ChatResponse(content="ok")


# ----------------------------------------------------------------------------- dispatch


async def dispatch_cost(keys: int, balancing: str, callers: int, total: int, repeat: int) -> float:
    provider = Instant()
    config = custom_config(keys, 1_000_000, balancing)
    async with Router.open(config, providers={"p": provider}) as router:
        per = total // callers

        async def caller() -> None:
            for _ in range(per):
                await router.submit(REQUEST)

        best = math.inf
        for n in range(repeat + 1):
            t0 = time.thread_time()
            async with trio.open_nursery() as nursery:
                for _ in range(callers):
                    nursery.start_soon(caller)
            if n:  # the first round warms up every actor's workers
                best = min(best, (time.thread_time() - t0) / (per * callers))
    return best * 1e6


def run_dispatch(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    trio.run(dispatch_cost, 1, "ordered", args.callers, args.dispatch_requests, 1)  # warm-up
    for balancing in ("ordered", "round_robin"):
        base = None
        for keys in (1, 10, 100, 1000):
            us = trio.run(dispatch_cost, keys, balancing, args.callers, args.dispatch_requests,
                          args.repeat)  # fmt: skip
            base = base or us
            rows.append({"balancing": balancing, "keys": keys, "us": us, "vs_1": us / base})
            print(f"dispatch {balancing:11s} keys={keys:5d}  {us:6.2f} us/request "
                  f"({us / base:.2f}x)", flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- in flight


async def inflight_wave(n: int, routed: bool, measure_memory: bool) -> dict[str, Any]:
    provider = Sleeper(1.0)
    config = custom_config(1, n + 10, "ordered")
    key = ApiKey("p", "k0", "")
    async with Router.open(config, providers={"p": provider}) as router:

        async def call() -> object:
            if routed:
                return await router.submit(REQUEST)
            return await provider.complete(REQUEST, key)

        latencies: list[float] = []

        async def one() -> None:
            t0 = time.perf_counter()
            await call()
            latencies.append(time.perf_counter() - t0)

        gc.collect()
        mem = 0.0
        rss0 = c.rss_bytes()
        if measure_memory:
            tracemalloc.start()
            base = tracemalloc.get_traced_memory()[0]
        t0 = time.perf_counter()
        cpu0 = time.process_time()
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
            await trio.sleep(0.6)  # everything is parked upstream now
            if measure_memory:
                mem = (tracemalloc.get_traced_memory()[0] - base) / n
                tracemalloc.stop()
            rss = (c.rss_bytes() - rss0) / n
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    res = c.summarize(latencies, elapsed, cpu)
    res.update({"in_flight": n, "bytes_per_request": mem, "rss_per_request": rss})
    return res


def run_inflight(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for n in args.inflight:
        routed = trio.run(inflight_wave, n, True, False)
        mem_routed = trio.run(inflight_wave, n, True, True)["bytes_per_request"]
        mem_direct = trio.run(inflight_wave, n, False, True)["bytes_per_request"]
        routed.update({
            "bytes_per_request": mem_routed,
            "direct_bytes_per_request": mem_direct,
            "router_bytes_per_request": mem_routed - mem_direct,
        })  # fmt: skip
        rows.append(routed)
        share = (mem_routed - mem_direct) / 1024
        print(f"inflight {n:6d}  {routed['rps']:8.0f} req/s  p50 {routed['p50_ms']:7.1f} ms  "
              f"p99 {routed['p99_ms']:7.1f} ms  {mem_routed / 1024:6.1f} KiB/request "
              f"(router's share {share:5.1f} KiB)", flush=True)  # fmt: skip
    return rows


async def inflight_http_wave(base: str, n: int, mode: str) -> dict[str, Any]:
    """N requests in flight at once over real HTTP to an upstream holding each 1.5 s:
    memory per request while all are parked (tracemalloc), for `router.submit` and for
    raw httpx on the same upstream."""
    import httpx

    per_key = 256
    config = RouterConfig.from_toml(c.router_config(base, -(-n // per_key), per_key))
    body = json.dumps({"model": c.UPSTREAM_MODEL, "messages": c.PROMPT}).encode()
    headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}
    async with contextlib.AsyncExitStack() as stack:
        if mode == "router":
            router = await stack.enter_async_context(Router.open(config))

            async def call() -> object:
                return await router.submit(REQUEST)

        else:
            limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
            client = await stack.enter_async_context(httpx.AsyncClient(limits=limits))

            async def call() -> object:
                r = await client.post(base + "/chat/completions", content=body, headers=headers)
                return r.json()

        async def wave() -> None:
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(call)

        await wave()  # warm: connections open and pooled
        gc.collect()
        tracemalloc.start()
        base_mem = tracemalloc.get_traced_memory()[0]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(wave)
            await trio.sleep(0.8)  # every request is parked upstream now
            mem = (tracemalloc.get_traced_memory()[0] - base_mem) / n
        tracemalloc.stop()
    return {"mode": mode, "in_flight": n, "bytes_per_request": mem}


def run_inflight_http(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    port = c.free_port()
    argv = [sys.executable, str(PACED), "upstream", "--port", str(port), "--hold", "1.5"]
    with c.spawned(argv) as proc:
        c.wait_port(port, proc, 10)
        base = f"http://127.0.0.1:{port}/v1"
        for n in args.inflight_http:
            for mode in ("raw", "router"):
                r = trio.run(inflight_http_wave, base, n, mode)
                rows.append(r)
                print(f"inflight http {mode:8s} {n:6d}  {r['bytes_per_request'] / 1024:6.1f} "
                      "KiB/request", flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- streaming


async def stream_inprocess(base: str, conc: int, total: int, shard: int) -> dict[str, Any]:
    keys = c.shard_count(conc, shard)
    config = RouterConfig.from_toml(c.router_config(base, keys, shard))
    chunks = 0
    async with Router.open(config) as router:

        async def call(i: int) -> None:
            nonlocal chunks
            async with router.stream(REQUEST) as stream:
                async for _ in stream:
                    chunks += 1

        await c.closed_loop(call, conc, max(conc, 20))
        chunks = 0
        cpu0 = time.process_time()
        lat, elapsed, errors = await c.closed_loop(call, conc, total, 30)
        cpu = time.process_time() - cpu0
    res = c.summarize(lat, elapsed, cpu, errors)
    res.update({"chunks": chunks, "chunks_per_s": chunks / elapsed})
    return res


def run_stream(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {"router.stream": [], "gateway": []}
    with c.nginx_upstream() as base, tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        sbase = base.replace("/v1", "/stream/v1")
        for conc in args.stream_levels:
            total = max(args.streams, 2 * conc)
            res = trio.run(stream_inprocess, sbase, conc, total, args.shard_size)
            res["concurrency"] = conc
            out["router.stream"].append(res)
            _print_stream("router.stream", conc, res)
        for conc in args.stream_levels:
            total = max(args.streams, 2 * conc)
            port = c.free_port()
            cfg = Path(tmp) / f"gw{conc}.toml"
            keys = c.shard_count(conc, args.shard_size)
            cfg.write_text(c.router_config(sbase, keys, args.shard_size, port))
            argv = [Path(sys.executable).parent / "llm-router", "serve", "--config", cfg,
                    "--log-level", "WARNING"]  # fmt: skip
            with c.spawned(argv, log=Path(tmp) / "gw.log") as proc:
                c.wait_port(port, proc, 30)
                url = f"http://127.0.0.1:{port}/v1/chat/completions"
                rep = c.run_loadgen(
                    url, conc, total, model="m", stream=True, max_seconds=30,
                    warmup=max(conc, 20), server_pid=proc.pid,
                )  # fmt: skip
                cpu = rep["server_cpu"]
            res = c.summarize(rep["latencies"], rep["elapsed"], cpu, rep["errors"])
            res.update({
                "concurrency": conc, "chunks": rep["chunks"],
                "chunks_per_s": rep["chunks"] / rep["elapsed"],
            })  # fmt: skip
            out["gateway"].append(res)
            _print_stream("gateway", conc, res)
    return out


def _print_stream(label: str, conc: int, res: dict[str, Any]) -> None:
    print(f"stream {label:14s} {conc:4d}  {res['chunks_per_s']:9.0f} chunks/s  "
          f"{res['rps']:6.0f} streams/s  p99 {res['p99_ms']:7.1f} ms  "
          f"errors {res['errors']}", flush=True)  # fmt: skip


# ----------------------------------------------------------------------------- failover


def failover_config(emu: str, down_port: int) -> RouterConfig:
    return RouterConfig.from_toml(f"""
[router]
balancing = "round_robin"
transient_retries = 0       # a failed attempt moves on at once (no in-place retry)
timeout = 30.0
attempt_timeout = 10.0
[[providers]]
name = "emu"
kind = "openai"
base_url = "{emu}/v1"
max_concurrency = 64
keys = [{{ id = "flaky", secret = "sk-flaky" }}, {{ id = "good", secret = "sk-good" }}]
[[providers]]
name = "backup"
kind = "openai"
base_url = "{emu}/v1"
max_concurrency = 64
keys = [{{ id = "b", secret = "sk-backup" }}]
[[providers]]
name = "down"
kind = "openai"
base_url = "http://127.0.0.1:{down_port}/v1"
max_concurrency = 64
keys = [{{ id = "d", secret = "sk-down" }}]
[[models]]
name = "m"
provider = "emu"
upstream = "gpt-4o-mini"
fallbacks = ["backup-m"]
[[models]]
name = "backup-m"
provider = "backup"
upstream = "gpt-4o-mini"
[[models]]
name = "down-first"
provider = "down"
upstream = "gpt-4o-mini"
fallbacks = ["m"]
""")


def _admin(emu: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        emu + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:  # loopback only
        return dict(json.loads(r.read()))


def script_faults(emu: str, total: int, latency: float, flaky_rate: float) -> None:
    _admin(emu, "/_emulator/reset", {})
    rng = random.Random(6)
    healthy = [{"latency": latency}] * (total * 3)
    _admin(emu, "/_emulator/script", {"key": None, "model": None, "faults": healthy})
    if flaky_rate:
        faults = [
            {"latency": latency, "status": 503}
            if rng.random() < flaky_rate
            else {"latency": latency}
            for _ in range(total * 2)
        ]
        _admin(emu, "/_emulator/script", {"key": "sk-flaky", "faults": faults})


async def failover_run(
    emu: str, down_port: int, model: str, conc: int, total: int
) -> dict[str, Any]:
    config = failover_config(emu, down_port)
    request = ChatRequest(model=model, messages=[Message("user", "Say hello.")])
    served: dict[str, int] = {}
    attempts = 0
    async with Router.open(config) as router:

        async def call(i: int) -> None:
            nonlocal attempts
            r = await router.submit(request)
            where = f"{r.model}/{r.key_id}"
            served[where] = served.get(where, 0) + 1
            attempts += len(r.attempts)

        lat, elapsed, errors = await c.closed_loop(call, conc, total, 60)
        snapshot = router.snapshot()
    res = c.summarize(lat, elapsed, 0.0, errors)
    res["success_rate"] = len(lat) / max(1, len(lat) + errors)
    res["served_by"] = served
    res["attempts_per_request"] = attempts / max(1, len(lat))
    res["breakers"] = {f"{k.provider}/{k.key_id}": f"{k.breaker} (opened {k.opens}x)"
                       for k in snapshot.keys}  # fmt: skip
    del res["cpu_us"]
    return res


@contextlib.contextmanager
def emulator_process(tmp: str) -> Iterator[tuple[str, int]]:
    """`python -m router.emulator` on a free loopback port; yields (URL, pid)."""
    port = c.free_port()
    argv = [sys.executable, "-m", "router.emulator", "--port", str(port)]
    with c.spawned(argv, log=Path(tmp) / "emulator.log") as proc:
        c.wait_port(port, proc, 30)
        yield f"http://127.0.0.1:{port}", proc.pid


def run_failover(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    down_port = c.free_port()  # nothing listens there: connection refused
    with (
        tempfile.TemporaryDirectory(prefix="bench-emu-") as tmp,
        emulator_process(tmp) as (emu, _),
    ):
        scenarios = [
            ("healthy (baseline)", "m", 0.0),
            ("one of two keys fails 30% (503)", "m", 0.3),
            ("primary provider down (refused)", "down-first", 0.0),
        ]
        for label, model, rate in scenarios:
            script_faults(emu, args.failover_requests, args.latency, rate)
            res = trio.run(failover_run, emu, down_port, model, args.failover_concurrency,
                           args.failover_requests)  # fmt: skip
            res["scenario"] = label
            rows.append(res)
            print(f"failover {label:34s} success {res['success_rate'] * 100:6.2f}%  "
                  f"p50 {res['p50_ms']:6.1f} ms  p99 {res['p99_ms']:7.1f} ms  "
                  f"{res['served_by']}", flush=True)  # fmt: skip
    base = rows[0]
    for r in rows:
        r["added_p50_ms"] = r["p50_ms"] - base["p50_ms"]
        r["added_p99_ms"] = r["p99_ms"] - base["p99_ms"]
    return rows


# ----------------------------------------------------------------------------- tails


def tail_config(emu: str, hedge_after: float | None, continuations: int) -> RouterConfig:
    """One OpenAI-compatible provider with two keys; model m on it."""
    hedge = f"hedge_after = {hedge_after}" if hedge_after is not None else ""
    return RouterConfig.from_toml(f"""
[router]
timeout = 30.0
attempt_timeout = 20.0
first_token_timeout = 20.0
transient_retries = 0
max_continuations = {continuations}
{hedge}
[[providers]]
name = "emu"
kind = "openai"
base_url = "{emu}/v1"
max_concurrency = 128
keys = [{{ id = "a", secret = "sk-a" }}, {{ id = "b", secret = "sk-b" }}]
[[models]]
name = "m"
provider = "emu"
upstream = "gpt-4o-mini"
""")


def script_tail(emu: str, total: int, latency: float, share: float, fault: dict[str, Any]) -> None:
    """Key a (every request's first choice): `share` of its answers get `fault`; the
    others, and key b's, answer after `latency`."""
    _admin(emu, "/_emulator/reset", {})
    rng = random.Random(14)
    faults = [{**fault} if rng.random() < share else {"latency": latency} for _ in range(total)]
    _admin(emu, "/_emulator/script", {"key": "sk-a", "faults": faults})
    normal = [{"latency": latency}] * (total * 2)
    _admin(emu, "/_emulator/script", {"key": "sk-b", "faults": normal})


def _emulator_calls(emu: str) -> int:
    with urllib.request.urlopen(emu + "/_emulator/calls", timeout=30) as r:  # loopback only
        return len(json.loads(r.read()))


async def tail_run(
    emu: str, config: RouterConfig, conc: int, total: int, stream: bool
) -> dict[str, Any]:
    words = " ".join(f"w{i}" for i in range(24))
    request = ChatRequest(model="m", messages=[Message("user", words)])
    complete = 0
    cut = 0
    async with Router.open(config) as router:

        async def call(i: int) -> None:
            nonlocal complete, cut
            if not stream:
                await router.submit(request)
                return
            try:
                async with router.stream(request) as s:
                    text = "".join([chunk.text async for chunk in s])
            except StreamInterruptedError:
                cut += 1
                raise
            if text == f"echo: {words}":
                complete += 1

        lat, elapsed, errors = await c.closed_loop(call, conc, total, 120)
    res = c.summarize(lat, elapsed, 0.0, errors)
    del res["cpu_us"]
    res["max_ms"] = max(lat, default=0.0) * 1e3
    res["upstream_calls"] = _emulator_calls(emu)
    res["requests_done"] = len(lat) + errors
    if stream:
        res["complete_share"] = complete / max(1, len(lat) + errors)
        res["interrupted"] = cut
    return res


def run_hedging(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    total, share = args.tail_requests, 0.05
    with (
        tempfile.TemporaryDirectory(prefix="bench-emu-") as tmp,
        emulator_process(tmp) as (emu, _),
    ):
        for label, hedge in (("without hedging", None), ("hedge_after = 1 s", 1.0)):
            script_tail(emu, total, args.latency, share, {"latency": 10.0})
            config = tail_config(emu, hedge, 0)
            res = trio.run(tail_run, emu, config, args.tail_concurrency, total, False)
            res["scenario"] = label
            res["extra_calls"] = res["upstream_calls"] - res["requests_done"]
            rows.append(res)
            print(f"hedging {label:18s} p50 {res['p50_ms']:7.1f} ms  p99 {res['p99_ms']:8.1f} ms  "
                  f"upstream calls {res['upstream_calls']} for {res['requests_done']} requests",
                  flush=True)  # fmt: skip
    return rows


def run_continuation(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    total, share = args.tail_requests, 0.05
    with (
        tempfile.TemporaryDirectory(prefix="bench-emu-") as tmp,
        emulator_process(tmp) as (emu, _),
    ):
        for label, continuations in (("without continuation", 0), ("max_continuations = 1", 1)):
            script_tail(emu, total, args.latency, share, {"cut_after_chunks": 8})
            config = tail_config(emu, None, continuations)
            res = trio.run(tail_run, emu, config, args.tail_concurrency, total, True)
            res["scenario"] = label
            rows.append(res)
            print(f"continuation {label:22s} complete {res['complete_share'] * 100:6.2f}%  "
                  f"interrupted {res['interrupted']}  p99 {res['p99_ms']:7.1f} ms",
                  flush=True)  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- streams


def _upstream_stats(base: str) -> dict[str, int]:
    """The upstream's counts. Each call opens a connection of its own (counted): the
    difference of two calls' `connections` is what was opened between them, plus one."""
    with urllib.request.urlopen(base.replace("/v1", "/stats"), timeout=10) as r:
        return dict(json.loads(r.read()))


def _proc_rss(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _stream_summary(
    n: int, events: int, cpu: float, rss0: int, rss_peak: int, ttfe: list[float],
    gaps: list[float], completed: int, errors: int, conns: int, streams: int,
) -> dict[str, Any]:  # fmt: skip
    ttfe, gaps = sorted(ttfe), sorted(gaps)
    return {
        "streams": n,
        "completed": completed,
        "errors": errors,
        "events": events,
        "cpu_us_per_event": cpu / events * 1e6 if events else None,
        "cpu_s": cpu,
        "rss_kib_per_stream": max(0, rss_peak - rss0) / 1024 / n,
        "ttfe_p50_ms": c.percentile(ttfe, 50) * 1e3 if ttfe else None,
        "ttfe_p99_ms": c.percentile(ttfe, 99) * 1e3 if ttfe else None,
        "gap_p99_ms": c.percentile(gaps, 99) * 1e3 if gaps else None,
        "gap_max_ms": gaps[-1] * 1e3 if gaps else None,
        "connections_per_stream": conns / streams if streams else None,
    }


def _ramp(n: int) -> float:
    return max(1.0, n / 600)  # 3,000 streams start over 5 s


class _GcClock:
    """CPU seconds spent in garbage collections while `on` (a `gc.callbacks` hook)."""

    def __init__(self) -> None:
        self.on = False
        self.seconds = 0.0
        self.collections = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.process_time()
        elif self.on:
            self.seconds += time.process_time() - self._start
            self.collections += 1


async def streams_inprocess(
    base: str, n: int, args: argparse.Namespace, tuned: bool = False
) -> dict[str, Any]:
    """N paced streams through `router.stream` in this process; `tuned`: with
    `router.tune_gc()` applied (and undone after)."""
    previous = tune_gc() if tuned else None
    gc_clock = _GcClock()
    gc.callbacks.append(gc_clock)
    try:
        return await _streams_inprocess(base, n, args, gc_clock)
    finally:
        gc.callbacks.remove(gc_clock)
        if previous is not None:
            gc.set_threshold(*previous)
            gc.unfreeze()


async def _streams_inprocess(
    base: str, n: int, args: argparse.Namespace, gc_clock: _GcClock
) -> dict[str, Any]:
    per_key = 256
    config = RouterConfig.from_toml(c.router_config(base, -(-n // per_key), per_key))
    ttfe: list[float] = []
    gaps: list[float] = []
    done = events = errors = 0
    target = -(-n // per_key)
    all_done = trio.Event()
    async with Router.open(config) as router:

        async def one(delay: float) -> None:
            nonlocal done, events, errors
            await trio.sleep(delay)
            start = last = time.monotonic()
            first = True
            gap = 0.0
            try:
                async with router.stream(REQUEST) as stream:
                    async for chunk in stream:
                        now = time.monotonic()
                        if first:
                            ttfe.append(now - start)
                            first = False
                        else:
                            gap = max(gap, now - last)
                        last = now
                        if chunk.text:
                            events += 1
                done += 1
                gaps.append(gap)
            except Exception:
                errors += 1
            if done + errors >= target:
                all_done.set()

        async with trio.open_nursery() as nursery:  # warm-up: one stream per key
            for _ in range(-(-n // per_key)):
                nursery.start_soon(one, 0.0)
        ttfe.clear()
        gaps.clear()
        done = events = errors = 0
        target = n
        all_done = trio.Event()
        before = _upstream_stats(base)
        gc.collect()
        rss0 = c.rss_bytes()
        peak = rss0
        ramp = _ramp(n)
        gc_clock.on = True
        cpu0 = time.process_time()
        with trio.move_on_after(ramp + args.stream_events * args.stream_interval * 3 + 30):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    nursery.start_soon(one, ramp * i / n)

                async def sample() -> None:
                    nonlocal peak
                    while True:
                        await trio.sleep(1.0)
                        peak = max(peak, c.rss_bytes())

                nursery.start_soon(sample)
                await all_done.wait()
                nursery.cancel_scope.cancel()
        cpu = time.process_time() - cpu0
        gc_clock.on = False
        after = await trio.to_thread.run_sync(_upstream_stats, base)
    res = _stream_summary(
        n, events, cpu, rss0, peak, ttfe, gaps, done, errors,
        after["connections"] - before["connections"] - 1, after["streams"] - before["streams"],
    )  # fmt: skip
    res["gc_share"] = gc_clock.seconds / cpu if cpu else None
    res["gc_collections"] = gc_clock.collections
    return res


_FLOOR_BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"stream":true}'


async def streams_floor(base: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The floor under the library's per-event cost: the same N paced streams read by
    bare trio, one task per stream waiting on its socket (`wait_readable`) and reading
    it (`os.read`), counting events without parsing HTTP, SSE or JSON."""
    host, port = base.split("//")[1].split("/")[0].split(":")
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\ncontent-type: application/json"
        b"\r\ncontent-length: %d\r\n\r\n%s" % (host.encode(), len(_FLOOR_BODY), _FLOOR_BODY)
    )
    ttfe: list[float] = []
    gaps: list[float] = []
    done = events = errors = 0

    async def one(delay: float) -> None:
        nonlocal done, events, errors
        await trio.sleep(delay)
        start = last = time.monotonic()
        gap = 0.0
        first = True
        sock = trio.socket.socket()
        try:
            await sock.connect((host, int(port)))
            await sock.send(request)
            fd = sock.fileno()
            while True:
                await trio.lowlevel.wait_readable(fd)
                data = os.read(fd, 65536)
                now = time.monotonic()
                count = data.count(b"data: {")
                if count:
                    if first:
                        ttfe.append(now - start)
                        first = False
                    else:
                        gap = max(gap, now - last)
                    last = now
                    events += count
                if not data or data.endswith(b"0\r\n\r\n"):
                    break
            done += 1
            gaps.append(gap)
        except OSError:
            errors += 1
        finally:
            sock.close()

    before = await trio.to_thread.run_sync(_upstream_stats, base)
    gc.collect()
    rss0 = c.rss_bytes()
    ramp = _ramp(n)
    cpu0 = time.process_time()
    async with trio.open_nursery() as nursery:
        for i in range(n):
            nursery.start_soon(one, ramp * i / n)
    cpu = time.process_time() - cpu0
    after = await trio.to_thread.run_sync(_upstream_stats, base)
    # (events counted here include the role, finish and usage events: 3 per stream more)
    return _stream_summary(
        n, events, cpu, rss0, c.rss_bytes(), ttfe, gaps, done, errors,
        after["connections"] - before["connections"] - 1, after["streams"] - before["streams"],
    )  # fmt: skip


async def streams_sequential(base: str, count: int) -> dict[str, Any]:
    """`count` streams one after the other on one key: connections opened per stream."""
    config = RouterConfig.from_toml(c.router_config(base, 1, 4))
    async with Router.open(config) as router:
        before = await trio.to_thread.run_sync(_upstream_stats, base)
        for _ in range(count):
            async with router.stream(REQUEST) as stream:
                async for _chunk in stream:
                    pass
        after = await trio.to_thread.run_sync(_upstream_stats, base)
    conns = after["connections"] - before["connections"] - 1
    return {"streams": count, "connections": conns, "connections_per_stream": conns / count}


def _streams_over_http(
    url: str, n: int, pid: int, base: str, token: str = "", model: str = "m"
) -> dict[str, Any]:
    before = _upstream_stats(base)
    rss0 = _proc_rss(pid)
    cpu0 = c.tree_cpu_seconds(pid)
    argv = [sys.executable, str(PACED), "client", "--url", url, "--streams", str(n),
            "--ramp", str(_ramp(n)), "--token", token, "--model", model]  # fmt: skip
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        peak = rss0
        while proc.poll() is None:
            time.sleep(1.0)
            peak = max(peak, _proc_rss(pid))
        out.seek(0)
        text = out.read().decode(errors="replace")
        lines = [ln for ln in text.splitlines() if ln.startswith("{")]
    cpu = c.tree_cpu_seconds(pid) - cpu0
    after = _upstream_stats(base)
    if not lines:
        raise RuntimeError("stream client printed no report")
    rep = json.loads(lines[-1])
    res = _stream_summary(
        n, rep["events"], cpu, rss0, peak, rep["ttfe"], rep["gaps"], rep["completed"],
        rep["errors"], after["connections"] - before["connections"] - 1,
        after["streams"] - before["streams"],
    )  # fmt: skip
    res["client_cpu_s"] = rep["client_cpu"]
    if rep.get("first_error"):
        res["first_error"] = rep["first_error"]
    return res


def _times_floor(r: dict[str, Any], floor: dict[int, float | None]) -> str:
    """A row's CPU per event over the bare-trio floor's at the same number of streams,
    measured in the same run: the figure that carries over between machines (this
    shared VM's speed has varied twofold between days)."""
    base = floor.get(r["streams"])
    v = r["cpu_us_per_event"]
    if not base or v is None:
        return ""
    return f"{v / base:.2f}×"


def _print_streams(label: str, r: dict[str, Any]) -> None:
    per_event = r["cpu_us_per_event"]
    gc_share = r.get("gc_share")
    print(f"streams {label:24s} {r['streams']:5d}  completed {r['completed']:5d}  "
          f"{per_event if per_event is None else round(per_event, 1)} µs/event  "
          f"gap max {r['gap_max_ms']} ms  conns/stream {r['connections_per_stream']}"
          + (f"  GC {gc_share * 100:.0f}% of CPU" if gc_share is not None else ""),
          flush=True)  # fmt: skip


def run_streams(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"events": args.stream_events, "interval": args.stream_interval}
    rows: dict[str, list[dict[str, Any]]] = {
        "trio floor": [],
        "router.stream": [],
        "router.stream, tune_gc()": [],
        "gateway": [],
        "litellm-proxy": [],
    }
    with tempfile.TemporaryDirectory(prefix="bench-streams-") as tmp:
        port = c.free_port()
        up = [sys.executable, str(PACED), "upstream", "--port", str(port), "--events",
              str(args.stream_events), "--interval", str(args.stream_interval)]  # fmt: skip
        quick_port = c.free_port()
        quick = [sys.executable, str(PACED), "upstream", "--port", str(quick_port),
                 "--events", "5", "--interval", "0.001"]  # fmt: skip
        with c.spawned(up, log=Path(tmp) / "up.log") as upp, c.spawned(quick) as qp:
            c.wait_port(port, upp, 10)
            c.wait_port(quick_port, qp, 10)
            base = f"http://127.0.0.1:{port}/v1"
            out["sequential"] = trio.run(
                streams_sequential, f"http://127.0.0.1:{quick_port}/v1", 50
            )
            print(f"streams sequential: {out['sequential']}", flush=True)
            for n in args.stream_counts:
                r = trio.run(streams_floor, base, n, args)
                rows["trio floor"].append(r)
                _print_streams("trio floor", r)
                for label, tuned in (("router.stream", False), ("router.stream, tune_gc()", True)):
                    r = trio.run(streams_inprocess, base, n, args, tuned)
                    rows[label].append(r)
                    _print_streams(label, r)
            for n in args.stream_counts:
                gport = c.free_port()
                cfg = Path(tmp) / "gw.toml"
                per_key = 256
                cfg.write_text(
                    c.router_config(base, -(-n // per_key), per_key, gport)
                    + f"max_in_flight = {n + 64}\nmax_connections = {n + 256}\n"
                )
                argv = [Path(sys.executable).parent / "llm-router", "serve", "--config", cfg,
                        "--log-level", "WARNING", "--access-log", "off"]  # fmt: skip
                with c.spawned(argv, log=Path(tmp) / "gw.log") as proc:
                    c.wait_port(gport, proc, 30)
                    url = f"http://127.0.0.1:{gport}/v1/chat/completions"
                    _streams_over_http(url, 8, proc.pid, base)  # warm-up
                    r = _streams_over_http(url, n, proc.pid, base)
                rows["gateway"].append(r)
                _print_streams("gateway", r)
            if args.stream_litellm:
                import throughput

                ok, why = throughput.ensure_litellm(True)
                if not ok:
                    out["litellm_skipped"] = why
                for n in args.stream_litellm if ok else []:
                    proxy = throughput.LiteLLMProxy(base, Path(tmp))
                    with c.spawned(proxy.argv, env=proxy.env, log=proxy.log, grace=5) as proc:
                        c.wait_port(proxy.port, proc, 120)
                        url = f"http://127.0.0.1:{proxy.port}/chat/completions"
                        _streams_over_http(url, 8, proc.pid, base, proxy.master_key)
                        r = _streams_over_http(url, n, proc.pid, base, proxy.master_key)
                    rows["litellm-proxy"].append(r)
                    _print_streams("litellm-proxy", r)
    out["rows"] = rows
    return out


# ----------------------------------------------------------------------------- gateway overhead


def gateway_overhead_level(
    emu: str, emu_pid: int, tmp: str, conc: int, jitter: float, args: argparse.Namespace
) -> dict[str, Any]:
    """One gateway process in front of the emulator, driven at `conc` concurrent callers
    for `args.overhead_seconds`. Every upstream answer is scripted to take
    `args.overhead_latency` seconds (plus up to `jitter` more, uniformly); enough faults
    are queued that none runs out."""
    latency, seconds = args.overhead_latency, args.overhead_seconds
    warmup = max(4, 2 * conc)
    expected = conc / (latency + jitter / 2)
    total = math.ceil(conc / latency * seconds * 2) + conc  # max_seconds ends the run first
    _admin(emu, "/_emulator/reset", {})
    faults = [{"latency": latency, "jitter": jitter}] * (2 * (warmup + total))
    _admin(emu, "/_emulator/script", {"key": None, "model": None, "faults": faults})
    port = c.free_port()
    cfg = Path(tmp) / f"gw{conc}-{jitter}.toml"
    keys = c.shard_count(conc, args.shard_size)
    cfg.write_text(c.router_config(f"{emu}/v1", keys, args.shard_size, port, provider="emu"))
    argv = [sys.executable, "-m", "router", "serve", "--config", cfg, "--log-level", "WARNING"]
    with c.spawned(argv, log=Path(tmp) / f"gw{conc}-{jitter}.log") as proc:
        c.wait_port(port, proc, 30)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        emu_cpu0, wall0 = c.tree_cpu_seconds(emu_pid), time.perf_counter()
        rep = c.run_loadgen(
            url, conc, total, model="m", max_seconds=seconds, warmup=warmup,
            server_pid=proc.pid,
        )  # fmt: skip
        emu_share = (c.tree_cpu_seconds(emu_pid) - emu_cpu0) / (time.perf_counter() - wall0)
    left = _admin(emu, "/_emulator/script", {"key": None, "model": None, "faults": []})["queued"]
    if left == 0:
        raise RuntimeError("the emulator ran out of scripted latency: raise the fault count")
    elapsed = max(rep["elapsed"], 1e-9)
    res = c.summarize(rep["latencies"], rep["elapsed"], rep["server_cpu"], rep["errors"])
    ov = sorted(rep["overhead_ms"])
    res.update({
        "concurrency": conc,
        "jitter_s": jitter,
        "expected_rps": expected,
        "overhead_samples": len(ov),
        "overhead_p50_ms": c.percentile(ov, 50),
        "overhead_p90_ms": c.percentile(ov, 90),
        "overhead_p99_ms": c.percentile(ov, 99),
        "overhead_max_ms": ov[-1] if ov else math.nan,
        "gateway_cpu_share": rep["server_cpu"] / elapsed,
        "emulator_cpu_share": emu_share,
        "loadgen_cpu_share": rep["loadgen_cpu"] / elapsed,
    })  # fmt: skip
    if rep["statuses"]:
        res["statuses"] = rep["statuses"]
    return res


def run_gateway_overhead(args: argparse.Namespace) -> dict[str, Any]:
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-gwo-") as tmp,
        emulator_process(tmp) as (emu, emu_pid),
    ):
        for jitter, conc in itertools.product(args.overhead_jitter, args.overhead_levels):
            res = gateway_overhead_level(emu, emu_pid, tmp, conc, jitter, args)
            rows.append(res)
            print(f"gateway_overhead {conc:4d} jitter {jitter:g} s  {res['rps']:6.0f} req/s "
                  f"(~{res['expected_rps']:.0f} if unsaturated)  overhead p50 "
                  f"{res['overhead_p50_ms']:.3f} p90 {res['overhead_p90_ms']:.3f} p99 "
                  f"{res['overhead_p99_ms']:.3f} ms  gateway CPU "
                  f"{res['gateway_cpu_share'] * 100:.0f}%  emulator CPU "
                  f"{res['emulator_cpu_share'] * 100:.0f}%  errors {res['errors']}",
                  flush=True)  # fmt: skip
    return {
        "latency_s": args.overhead_latency,
        "seconds": args.overhead_seconds,
        "shard_size": args.shard_size,
        "rows": rows,
    }


# ----------------------------------------------------------------------------- report


def build_markdown(p: dict[str, Any], args: argparse.Namespace) -> str:
    lines = ["# Scaling", "", f"Machine: {c.machine_line(p['meta'])}. Rerun: `{p['command']}`.", ""]
    measured = p.get("measured", {})
    if len(set(measured.values())) > 1:  # sections rerun at different times
        lines += ["Sections measured: " + "; ".join(f"`{k}` {v}" for k, v in measured.items())
                  + ".", ""]  # fmt: skip
    targets: list[list[str]] = []
    if "dispatch" in p:
        lines += [
            "## Dispatch cost against the number of key actors",
            "",
            f"Instant custom provider, {args.callers} concurrent callers, "
            f"{args.dispatch_requests} requests, trio-thread CPU time, best of {args.repeat}.",
            "",
            c.markdown_table(
                ["balancing", "key actors", "µs / request", "vs 1 key"],
                [
                    [r["balancing"], str(r["keys"]), f"{r['us']:.2f}", f"{r['vs_1']:.2f}x"]
                    for r in p["dispatch"]
                ],
                "lrrr",
            ),
            "",
        ]
        for bal in ("ordered", "round_robin"):
            worst = max(r["vs_1"] for r in p["dispatch"] if r["balancing"] == bal)
            targets.append([f"dispatch flat within 20% from 1 to 1,000 keys ({bal})",
                            f"worst {worst:.2f}x of 1 key",
                            "met" if worst <= 1.2 else "not met"])  # fmt: skip
    if "inflight" in p:
        lines += [
            "## Requests in flight against a 1 s upstream",
            "",
            "One wave of N concurrent `router.submit` calls to a custom provider sleeping 1 s "
            "(real clock). Memory: tracemalloc's traced bytes while all N are parked upstream, "
            "per request; the router's share subtracts the same wave of direct "
            "`provider.complete` calls (caller task + sleeping coroutine).",
            "",
            c.markdown_table(
                ["in flight", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "KiB/request",
                 "router's KiB/request", "RSS KiB/request"],
                [[str(r["in_flight"]), c.fmt(r["rps"]), c.fmt(r["p50_ms"], 1),
                  c.fmt(r["p99_ms"], 1), c.fmt(r["cpu_us"]),
                  f"{r['bytes_per_request'] / 1024:.1f}",
                  f"{r['router_bytes_per_request'] / 1024:.1f}",
                  f"{r['rss_per_request'] / 1024:.1f}"] for r in p["inflight"]],
            ),
            "",
        ]  # fmt: skip
        if p.get("inflight_http"):
            lines += [
                "Over real HTTP: N requests in flight at once to the `_paced.py` upstream, "
                "which holds each 1.5 s; tracemalloc's traced bytes per request while all are "
                "parked upstream, connections already open (the same measure for each row).",
                "",
                c.markdown_table(
                    ["path", "in flight", "KiB/request"],
                    [[HTTP_MODES.get(r["mode"], r["mode"]), str(r["in_flight"]),
                      f"{r['bytes_per_request'] / 1024:.1f}"] for r in p["inflight_http"]],
                ),
                "",
            ]  # fmt: skip
        worst = max(r["bytes_per_request"] for r in p["inflight"])
        targets.append(["under 20 KB memory per in-flight request", f"{worst / 1000:.1f} KB "
                        "(whole request incl. caller task)",
                        "met" if worst < 20_000 else "not met"])  # fmt: skip
    if "stream" in p:
        lines += [
            "## Streamed chunks relayed per second",
            "",
            f"nginx serves a fixed OpenAI stream of {c.STREAM_CHUNKS} content chunks (plus role "
            "and finish chunks). `router.stream` counts the chunks the caller iterates; the "
            "gateway row counts the SSE `data:` events the HTTP load generator receives.",
            "",
            c.markdown_table(
                ["path", "concurrent streams", "chunks/s", "streams/s", "p50 ms", "p99 ms",
                 "CPU µs/stream", "errors"],
                [[label, str(r["concurrency"]), c.fmt(r["chunks_per_s"]), c.fmt(r["rps"]),
                  c.fmt(r["p50_ms"], 1), c.fmt(r["p99_ms"], 1), c.fmt(r["cpu_us"]),
                  str(r["errors"])]
                 for label, rs in p["stream"].items() for r in rs],
            ),
            "",
        ]  # fmt: skip
    if "failover" in p:
        lines += [
            "## Failover under faults",
            "",
            f"Emulator subprocess, {args.latency * 1000:.0f} ms upstream latency, "
            f"{args.failover_requests} requests at {args.failover_concurrency} concurrent, "
            "`transient_retries = 0`, round robin over keys `flaky` and `good` of model `m` "
            "(fallback `backup-m` on another provider); `down-first` is a provider whose port "
            "refuses connections, falling back to `m`. Router defaults otherwise (breaker: 5 "
            "consecutive failures or 50% of the last calls opens it for 30 s).",
            "",
            c.markdown_table(
                ["scenario", "success", "p50 ms", "p99 ms", "added p50 ms", "added p99 ms",
                 "attempts/request", "served by", "breakers at the end"],
                [[r["scenario"], f"{r['success_rate'] * 100:.2f}%", c.fmt(r["p50_ms"], 1),
                  c.fmt(r["p99_ms"], 1), c.fmt(r["added_p50_ms"], 1), c.fmt(r["added_p99_ms"], 1),
                  f"{r['attempts_per_request']:.2f}",
                  ", ".join(f"{k}: {v}" for k, v in r["served_by"].items()),
                  ", ".join(f"{k} {v}" for k, v in r["breakers"].items())]
                 for r in p["failover"]],
                "lrrrrrrll",
            ),
            "",
        ]  # fmt: skip
    if "gateway_overhead" in p:
        g = p["gateway_overhead"]
        lines += [
            "## Gateway overhead when the gateway is not saturated",
            "",
            f"`python -m router serve` (one process, `kind = \"openai\"`, one key per "
            f"{g['shard_size']} callers) in front of the emulator, which answers every request "
            f"after {g['latency_s'] * 1000:.0f} ms (scripted latency; in the jitter rows plus "
            "a uniform random extra up to the jitter), so N concurrent requests need only "
            f"~N / {g['latency_s']:g} req/s. The HTTP load generator "
            f"(its own process, one keep-alive connection per caller) runs ~{g['seconds']:g} s "
            "per level after a warm-up. Overhead is the gateway's `x-router-overhead-ms` "
            "header: time to the response head minus the upstream attempt (and any retry "
            "backoff). CPU shares are of one core over the measured run (the emulator's "
            "includes the warm-up); the machine has "
            f"{p['meta']['cpus']} cores shared by all three processes.",
            "",
            c.markdown_table(
                ["concurrency", "upstream jitter", "req/s", "req/s if unsaturated",
                 "p50 ms", "p99 ms",
                 "overhead p50 ms", "overhead p90 ms", "overhead p99 ms", "overhead max ms",
                 "gateway CPU", "gateway CPU µs/req", "emulator CPU", "load gen CPU",
                 "requests", "errors"],
                [[str(r["concurrency"]), f"{r.get('jitter_s', 0) * 1000:.0f} ms",
                  c.fmt(r["rps"], 1), c.fmt(r["expected_rps"]),
                  c.fmt(r["p50_ms"], 1), c.fmt(r["p99_ms"], 1), c.fmt(r["overhead_p50_ms"], 3),
                  c.fmt(r["overhead_p90_ms"], 3), c.fmt(r["overhead_p99_ms"], 3),
                  c.fmt(r["overhead_max_ms"], 3), f"{r['gateway_cpu_share'] * 100:.0f}%",
                  c.fmt(r["cpu_us"]), f"{r['emulator_cpu_share'] * 100:.0f}%",
                  f"{r['loadgen_cpu_share'] * 100:.0f}%", str(r["requests"]), str(r["errors"])]
                 for r in g["rows"]],
            ),
            "",
            "The overhead includes any wait for the gateway's event loop. With a fixed "
            "upstream latency the callers come back in waves, so even a gateway that is "
            "mostly idle works through bursts of arrivals, and a request that waits behind "
            "its wave counts that wait as overhead. Random jitter spreads the waves (see the "
            "jitter rows). Rows whose req/s fall well short of the unsaturated rate are "
            "CPU-bound: the gateway, the emulator and the load generator share the machine's "
            f"{p['meta']['cpus']} cores.",
            "",
        ]  # fmt: skip
        for r in g["rows"]:
            if r["concurrency"] == 64:
                jitter = r.get("jitter_s", 0) * 1000
                targets.append([
                    "gateway overhead < 1 ms at p50 at 64, gateway not saturated "
                    f"(x-router-overhead-ms; {g['latency_s'] * 1000:.0f} ms upstream"
                    + (f" + up to {jitter:.0f} ms jitter)" if jitter else ")"),
                    f"{r['overhead_p50_ms']:.3f} ms (p99 {r['overhead_p99_ms']:.3f} ms) at "
                    f"{r['rps']:.0f} req/s, gateway CPU {r['gateway_cpu_share'] * 100:.0f}% "
                    "of a core",
                    "met" if r["overhead_p50_ms"] < 1.0 else "not met",
                ])  # fmt: skip
    if "hedging" in p:
        lines += [
            "## Tail latency: hedging",
            "",
            f"{args.tail_requests} requests at {args.tail_concurrency} concurrent; 5% of the "
            "first choice's answers (key a) take 10 s, the rest and key b's "
            f"{args.latency * 1000:.0f} ms (emulator).",
            "",
            c.markdown_table(
                ["scenario", "p50 (ms)", "p99 (ms)", "max (ms)", "upstream calls", "extra calls"],
                [[r["scenario"], c.fmt(r["p50_ms"], 1), c.fmt(r["p99_ms"], 1),
                  c.fmt(r["max_ms"], 1), str(r["upstream_calls"]), str(r["extra_calls"])]
                 for r in p["hedging"]],
            ),
            "",
        ]  # fmt: skip
    if "continuation" in p:
        lines += [
            "## Streams cut mid-answer: continuation",
            "",
            f"{args.tail_requests} streams at {args.tail_concurrency} concurrent; 5% of the "
            "first choice's streams (key a) are cut after 8 chunks (no finish reason). "
            "Key b replays the request (OpenAI-compatible: no prefill) and the answer is "
            "spliced on the exact prefix.",
            "",
            c.markdown_table(
                ["scenario", "complete answers", "interrupted", "p50 (ms)", "p99 (ms)"],
                [[r["scenario"], f"{r['complete_share'] * 100:.2f}%", str(r["interrupted"]),
                  c.fmt(r["p50_ms"], 1), c.fmt(r["p99_ms"], 1)]
                 for r in p["continuation"]],
            ),
            "",
        ]  # fmt: skip
    if "streams" in p:
        st = p["streams"]
        seq = st.get("sequential", {})
        floor = {r["streams"]: r["cpu_us_per_event"] for r in st["rows"].get("trio floor", [])}
        lines += [
            "## Many concurrent token-by-token streams",
            "",
            f"The minimal upstream of `_paced.py` sends each stream {st['events']} events "
            f"{st['interval'] * 1000:.0f} ms apart, one event per write (as a model decodes "
            "token by token). N streams start together (spread over N/600 s, at least 1 s). "
            "CPU is the process under test over the whole wave (stream set-up included) per "
            "relayed event; RSS per stream is the process's peak RSS growth over the wave "
            "divided by N; the gap is the largest time between two events of one stream "
            "(the pacing is 100 ms, so anything well above it is the relay falling behind). "
            "The HTTP rows are driven by a separate trio client process, one connection per "
            "stream. The trio floor reads the same streams with bare trio (a task per stream, "
            "`wait_readable` then `os.read`, events counted, nothing parsed): what any trio "
            "program pays per event at that load. At light load every event costs a whole "
            "event-loop wakeup, so the cost per event falls as streams are added. The GC "
            "share is the CPU the library's process spent in garbage collections "
            "(`router.tune_gc()` raises CPython's generation-0 threshold; the gateway rows "
            "run with it, `[gateway] gc_threshold`). The tuned library rows run after the "
            "default ones in the same process and reuse its memory: their RSS per stream "
            "is not comparable.",
            "",
            c.markdown_table(
                ["path", "streams", "completed", "CPU µs/event", "× trio floor",
                 "GC share of CPU", "RSS KiB/stream", "first event p50 ms", "p99 ms",
                 "gap p99 ms", "gap max ms", "upstream conns/stream"],
                [[label, str(r["streams"]), str(r["completed"]), c.fmt(r["cpu_us_per_event"], 1),
                  "" if label == "trio floor" else _times_floor(r, floor),
                  "" if r.get("gc_share") is None else f"{r['gc_share'] * 100:.0f}%",
                  c.fmt(r["rss_kib_per_stream"], 1), c.fmt(r["ttfe_p50_ms"], 1),
                  c.fmt(r["ttfe_p99_ms"], 1), c.fmt(r["gap_p99_ms"], 1),
                  c.fmt(r["gap_max_ms"], 1), c.fmt(r["connections_per_stream"], 2)]
                 for label, rows in st["rows"].items() for r in rows],
            ),
            "",
            f"Sequential streams on one key: {seq.get('streams', '?')} streams opened "
            f"{seq.get('connections', '?')} upstream connection(s).",
            "",
        ]  # fmt: skip
        for label, rows in st["rows"].items():
            for r in rows:
                if r["completed"] == r["streams"] and (r["ttfe_p99_ms"] or 0) > 1000:
                    lines += [
                        f"{label} at {r['streams']:,} streams is past what one process relays "
                        f"at this pace: streams wait to start (first event p50 "
                        f"{r['ttfe_p50_ms'] / 1000:.1f} s, p99 {r['ttfe_p99_ms'] / 1000:.1f} s), "
                        f"then flow (gap p99 {r['gap_p99_ms']:.0f} ms); every event arrived.",
                        "",
                    ]
                if r["completed"] < r["streams"] and r.get("first_error"):
                    lines += [
                        f"{label} at {r['streams']:,} streams: {r['completed']:,} completed; "
                        f"the client's first error: {r['first_error']} (events received: "
                        f"{r['events']:,} of {r['streams'] * st['events']:,}).",
                        "",
                    ]
        if st.get("litellm_skipped"):
            lines += [f"LiteLLM's proxy was skipped: {st['litellm_skipped']}", ""]
        # The per-event targets are about capacity (#13: "one gateway process relays
        # ≥ 1,200 concurrent streams of 10 events/s"): judged from 1,000 streams up. At
        # light load every event costs a whole event-loop wakeup (see the trio floor).
        for label, limit in (
            ("router.stream", 30.0),
            ("router.stream, tune_gc()", 30.0),
            ("gateway", 80.0),
        ):
            for r in st["rows"].get(label, []):
                v = r["cpu_us_per_event"]
                if v is None or r["streams"] < 1000:
                    continue
                targets.append([
                    f"{label} ≤ {limit:g} µs CPU per event, one event per upstream read, "
                    f"{r['streams']:,} streams (#13)",
                    f"{v:.1f} µs, {_times_floor(r, floor)} the trio floor "
                    f"({r['completed']:,}/{r['streams']:,} completed, largest gap "
                    f"{c.fmt(r['gap_max_ms'])} ms)",
                    "met" if v <= limit and r["completed"] == r["streams"] else "not met",
                ])  # fmt: skip
        if seq:
            targets.append(
                [
                    "one upstream connection reused across sequential streams (#13)",
                    f"{seq['connections']} connection(s) for {seq['streams']} streams",
                    "met" if seq["connections"] == 1 else "not met",
                ]
            )
    if targets:
        table = c.markdown_table(["target", "measured", "status"], targets, "lll")
        lines += ["## Targets", "", table, ""]
    p["targets"] = targets
    for note in p.get("notes", []):
        lines += [note, ""]
    if "inflight" in p:
        lines += ["![in-flight scaling](scaling_inflight.png)", ""]
    if "stream" in p:
        lines += ["![streaming](scaling_stream.png)", ""]
    if "streams" in p:
        lines += ["![concurrent streams](scaling_streams.png)", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--callers", type=int, default=100)
    parser.add_argument("--dispatch-requests", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--inflight", type=int, nargs="+", default=[100, 1000, 10_000])
    parser.add_argument("--inflight-http", type=int, nargs="+", default=[1000],
                        help="requests in flight over real HTTP (memory per request)")  # fmt: skip
    parser.add_argument("--stream-levels", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--streams", type=int, default=300, help="streams per level")
    parser.add_argument("--shard-size", type=int, default=8)
    parser.add_argument("--failover-requests", type=int, default=1000)
    parser.add_argument("--failover-concurrency", type=int, default=16)
    parser.add_argument("--latency", type=float, default=0.02, help="emulator latency (s)")
    parser.add_argument("--tail-requests", type=int, default=1000,
                        help="requests (streams) of hedging and continuation")  # fmt: skip
    parser.add_argument("--tail-concurrency", type=int, default=50)
    parser.add_argument("--overhead-levels", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--overhead-latency", type=float, default=0.5,
                        help="emulator latency for gateway_overhead (s)")  # fmt: skip
    parser.add_argument("--overhead-jitter", type=float, nargs="+", default=[0.0, 0.1],
                        help="extra random upstream latency up to this (s)")  # fmt: skip
    parser.add_argument("--overhead-seconds", type=float, default=15.0,
                        help="measured seconds per gateway_overhead level")  # fmt: skip
    parser.add_argument("--stream-counts", type=int, nargs="+", default=[100, 1000, 1200, 3000],
                        help="concurrent streams in the streams section")  # fmt: skip
    parser.add_argument("--stream-events", type=int, default=200)
    parser.add_argument("--stream-interval", type=float, default=0.1)
    parser.add_argument("--stream-litellm", type=int, nargs="*", default=[100, 1000],
                        help="stream counts for LiteLLM's proxy (none: skip it)")  # fmt: skip
    parser.add_argument("--render", action="store_true",
                        help="measure nothing: rebuild scaling.md and the charts from "
                             "scaling.json (after a change to the report)")  # fmt: skip
    args = parser.parse_args()
    if args.render:
        args.sections = []
    payload: dict[str, Any] = {
        "meta": c.machine(),
        "command": "python benchmarks/scaling.py",
    }
    stamp = f"{payload['meta']['date']}, router at {payload['meta']['commit']}"
    measured: dict[str, str] = {}
    previous = c.RESULTS / "scaling.json"
    if previous.exists():  # sections not rerun keep their last results (and dates)
        old = json.loads(previous.read_text())
        if args.render:
            payload["meta"] = old["meta"]
        kept = [k for k in SECTIONS if k in old and k not in args.sections]
        payload.update({k: old[k] for k in kept})
        if "inflight" in kept and "inflight_http" in old:  # (stored beside `inflight`)
            payload["inflight_http"] = old["inflight_http"]
        old_stamp = f"{old['meta']['date']}, router at {old['meta'].get('commit', '?')}"
        measured.update({k: old.get("measured", {}).get(k, old_stamp) for k in kept})
    measured.update({k: stamp for k in args.sections})
    payload["measured"] = {k: measured[k] for k in SECTIONS if k in measured}
    if "dispatch" in args.sections:
        payload["dispatch"] = run_dispatch(args)
    if "inflight" in args.sections:
        payload["inflight"] = run_inflight(args)
        payload["inflight_http"] = run_inflight_http(args)
    if "stream" in args.sections:
        payload["stream"] = run_stream(args)
    if "failover" in args.sections:
        payload["failover"] = run_failover(args)
    if "gateway_overhead" in args.sections:
        payload["gateway_overhead"] = run_gateway_overhead(args)
    if "hedging" in args.sections:
        payload["hedging"] = run_hedging(args)
    if "continuation" in args.sections:
        payload["continuation"] = run_continuation(args)
    if "streams" in args.sections:
        payload["streams"] = run_streams(args)
    markdown = build_markdown(payload, args)
    c.write_results("scaling", payload, markdown)
    if "inflight" in payload:
        c.plot_series(
            "scaling_inflight",
            "router.submit against a 1 s upstream",
            {
                "router.submit": [
                    (r["in_flight"], r["rps"], r["p99_ms"]) for r in payload["inflight"]
                ]
            },
            xlabel="requests in flight",
        )
    if "stream" in payload:
        c.plot_series(
            "scaling_stream",
            f"Streaming relay ({c.STREAM_CHUNKS}-chunk streams from nginx)",
            {
                label: [(r["concurrency"], r["chunks_per_s"], r["p99_ms"]) for r in rows]
                for label, rows in payload["stream"].items()
            },
            xlabel="concurrent streams",
            ylabels=("chunks / s", "p99 stream duration (ms)"),
        )
    if "streams" in payload:
        c.plot_series(
            "scaling_streams",
            f"Concurrent token-by-token streams ({payload['streams']['events']} events, "
            f"{payload['streams']['interval'] * 1000:.0f} ms apart)",
            {
                label: [(r["streams"], r["cpu_us_per_event"], r["gap_max_ms"]) for r in rows]
                for label, rows in payload["streams"]["rows"].items()
                if rows
            },
            xlabel="concurrent streams",
            ylabels=("CPU µs per relayed event", "largest gap between events (ms)"),
        )
    print(f"wrote {c.RESULTS}/scaling.{{json,md}} and charts")


if __name__ == "__main__":
    main()
