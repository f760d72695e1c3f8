"""Throughput side by side with the peers, against one local upstream that cannot be
the bottleneck (nginx on loopback returning a fixed OpenAI chat.completion).

    .venv/bin/python benchmarks/throughput.py                    # everything, a few minutes
    .venv/bin/python benchmarks/throughput.py --levels 64 256 --rows raw router --requests 1000

Rows (each run in a fresh process, warmed up, then a closed loop of `--requests`
requests per concurrency level; a run stops handing out requests after
`--max-seconds`):

- ``raw``: httpx on trio written by hand, one `httpx.AsyncClient` per shard of
  `--shard-size` concurrent callers (httpcore's pool costs O(connections) per request,
  so one client per shard is what a careful user writes): the floor.
- ``raw-transport``: the same hand-written loop on one `httpx.AsyncClient` whose
  transport is the router's own (`router._transport.RouterTransport`, the default of
  the HTTP providers): what the transport alone is worth to an httpx user.
- ``router``: `router.submit` in-process, ``kind = "openai"`` provider with one key per
  shard (`max_concurrency = --shard-size` each, ``balancing = "round_robin"``), so the
  router's per-key clients shard the pool exactly like the raw row.
- ``router-1key``: the same with a single key of `max_concurrency = concurrency` (one
  client whose pool has `concurrency + 4` connections): what the pool sizing costs.
- ``hypercorn``: Hypercorn's trio worker with an ASGI app that answers a fixed
  completion without calling anything (`_trivial_asgi.py`): the HTTP server's own cost,
  the floor under the gateway row.
- ``gateway``: `llm-router serve` (same config as ``router``) in its own process, driven
  over HTTP by the load generator of `_common.py` in another process.
- ``litellm``: LiteLLM's `Router.acompletion` (asyncio) in its own virtual environment
  (benchmarks/.venv-litellm, created here with pip), same upstream.
- ``litellm-proxy``: LiteLLM's proxy (``litellm[proxy]``), same load generator.

CPU µs/request is the CPU time of the process under test (the caller process for the
in-process rows, the server process tree for the HTTP rows) over the requests done.
Writes benchmarks/results/throughput.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import _common as c
import trio

ROWS = (
    "raw",
    "raw-transport",
    "router",
    "router-1key",
    "hypercorn",
    "gateway",
    "litellm",
    "litellm-proxy",
)
LABELS = {
    "raw": "raw httpx (sharded)",
    "raw-transport": "raw httpx on our transport",
    "router": "router.submit",
    "router-1key": "router.submit, 1 key",
    "hypercorn": "Hypercorn, trivial ASGI app",
    "gateway": "llm-router serve",
    "litellm": "LiteLLM Router",
    "litellm-proxy": "LiteLLM proxy",
}
LITELLM_VENV = c.BENCH / ".venv-litellm"
LITELLM_PY = LITELLM_VENV / "bin" / "python"
# LiteLLM must only talk to loopback: any other destination goes to a dead proxy.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
    "DISABLE_SCHEMA_UPDATE": "True",
}


# ----------------------------------------------------------------------------- configs


def keys_for(row: str, concurrency: int, shard: int) -> tuple[int, int]:
    if row == "router-1key":
        return 1, concurrency
    return c.shard_count(concurrency, shard), shard


# ----------------------------------------------------------------------------- workers


async def _worker(args: argparse.Namespace) -> dict[str, Any]:
    """One in-process row at one level (runs in its own process)."""
    import httpx

    from router import ChatRequest, Message, Router, RouterConfig

    conc, shard = args.concurrency, args.shard_size
    warmup = max(conc, 50)
    if args.worker == "raw-transport":
        from router._transport import RouterTransport

        client = httpx.AsyncClient(transport=RouterTransport(max_connections=conc + 4))
        url = args.url + "/chat/completions"
        body = json.dumps({"model": c.UPSTREAM_MODEL, "messages": c.PROMPT}).encode()
        headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}

        async def call(i: int) -> object:
            r = await client.post(url, content=body, headers=headers)
            r.raise_for_status()
            return json.loads(r.content)["choices"][0]["message"]["content"]

        result = await _measure(call, conc, args, warmup)
        await client.aclose()
        return result
    if args.worker == "raw":
        n = c.shard_count(conc, shard)
        per = math.ceil(conc / n) + 4
        clients = [
            httpx.AsyncClient(
                limits=httpx.Limits(max_connections=per, max_keepalive_connections=per),
                timeout=60.0,
            )
            for _ in range(n)
        ]
        url = args.url + "/chat/completions"
        body = json.dumps({"model": c.UPSTREAM_MODEL, "messages": c.PROMPT}).encode()
        headers = {"authorization": "Bearer sk-bench", "content-type": "application/json"}

        async def call(i: int) -> object:
            r = await clients[i // shard].post(url, content=body, headers=headers)
            r.raise_for_status()
            return json.loads(r.content)["choices"][0]["message"]["content"]

        result = await _measure(call, conc, args, warmup)
        for cl in clients:
            await cl.aclose()
        return result

    keys, per_key = keys_for(args.worker, conc, shard)
    config = RouterConfig.from_toml(c.router_config(args.url, keys, per_key))
    request = ChatRequest(model="m", messages=[Message("user", "Say hello.")])
    async with Router.open(config) as router:

        async def call(i: int) -> object:
            return (await router.submit(request)).content

        return await _measure(call, conc, args, warmup)


async def _measure(call: Any, conc: int, args: argparse.Namespace, warmup: int) -> dict[str, Any]:
    await c.closed_loop(call, conc, warmup)
    profiler = None
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.001, async_mode="disabled")
        profiler.start()
    cpu0 = time.process_time()
    lat, elapsed, errors = await c.closed_loop(call, conc, args.requests, args.max_seconds)
    cpu = time.process_time() - cpu0
    out: dict[str, Any] = {"latencies": lat, "elapsed": elapsed, "cpu": cpu, "errors": errors}
    if profiler is not None:
        profiler.stop()
        out["profile"] = profile_report(profiler)
    return out


def profile_report(profiler: Any) -> dict[str, Any]:
    """Self time by component, and the top functions by self time, from a pyinstrument
    session (sampling the trio thread: it shows where the CPU of the process goes)."""
    session = profiler.last_session
    root = session.root_frame()
    by_component: dict[str, float] = {}
    by_function: dict[str, float] = {}

    def component(path: str) -> str:
        if not path:
            return "other"
        for marker, name in (
            ("/router/", "router (this project)"),
            ("/httpcore/", "httpcore"),
            ("/httpx/", "httpx"),
            ("/h11/", "h11"),
            ("/trio/", "trio (scheduler, sockets)"),
            ("/json/", "json"),
            ("/anyio/", "anyio"),
            ("/sniffio/", "sniffio"),
            ("/outcome/", "outcome"),
            ("/idna/", "idna"),
            ("benchmarks/", "benchmark harness"),
        ):
            if marker in path:
                return name
        return "python stdlib / other"

    def walk(frame: Any) -> None:
        # A real frame's total_self_time already includes its synthetic "[self]"
        # children (pyinstrument), so those are skipped.
        if not frame.identifier.startswith("["):
            self_time = frame.total_self_time
            path = frame.file_path or ""
            if self_time:
                if path == "<built-in>":
                    comp = "C built-ins (socket calls, etc.)"
                    if "poll" in frame.function:
                        comp = "idle (epoll wait)"
                else:
                    comp = component(path)
                by_component[comp] = by_component.get(comp, 0.0) + self_time
                where = f"{frame.function} ({Path(path).parent.name}/{Path(path).name}:"
                where += f"{frame.line_no})"
                by_function[where] = by_function.get(where, 0.0) + self_time
        for child in frame.children:
            walk(child)

    walk(root)
    total = sum(by_component.values()) or 1.0
    return {
        "duration": session.duration,
        "samples": session.sample_count,
        "components": sorted(
            ((k, v / total * 100) for k, v in by_component.items()), key=lambda kv: -kv[1]
        ),
        "functions": sorted(
            ((k, v / total * 100) for k, v in by_function.items()), key=lambda kv: -kv[1]
        )[:25],
        "tree": profiler.output_text(unicode=False, color=False, short_mode=True)[:6000],
    }


# ----------------------------------------------------------------------------- rows


def run_inprocess(
    row: str, base: str, conc: int, total: int, args: argparse.Namespace, profile: bool = False
) -> dict[str, Any]:
    argv = [
        sys.executable, __file__, "--worker", row, "--url", base,
        "--concurrency", str(conc), "--requests", str(total),
        "--max-seconds", str(args.max_seconds), "--shard-size", str(args.shard_size),
    ]  # fmt: skip
    if profile:
        argv.append("--profile")
    rep = c.run_json(argv)
    res = c.summarize(rep["latencies"], rep["elapsed"], rep["cpu"], rep["errors"])
    if "profile" in rep:
        res["profile"] = rep["profile"]
    return res


def run_gateway(base: str, conc: int, total: int, args: argparse.Namespace) -> dict[str, Any]:
    keys, per_key = keys_for("router", conc, args.shard_size)
    port = c.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-gw-") as tmp:
        cfg = Path(tmp) / "router.toml"
        cfg.write_text(c.router_config(base, keys, per_key, port))
        llm_router = Path(sys.executable).parent / "llm-router"
        argv = [llm_router, "serve", "--config", cfg, "--log-level", "WARNING"]
        with c.spawned(argv, log=Path(tmp) / "gateway.log") as proc:
            c.wait_port(port, proc, 30)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            return _drive_http(url, "m", proc.pid, conc, total, args)


def run_hypercorn(conc: int, total: int, args: argparse.Namespace) -> dict[str, Any]:
    port = c.free_port()
    with tempfile.TemporaryDirectory(prefix="bench-hc-") as tmp:
        argv = [Path(sys.executable).parent / "hypercorn", "--worker-class", "trio",
                "--bind", f"127.0.0.1:{port}", "--root-path", "",
                "_trivial_asgi:app"]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(c.BENCH)}
        with c.spawned(argv, env=env, log=Path(tmp) / "hypercorn.log") as proc:
            c.wait_port(port, proc, 30)
            url = f"http://127.0.0.1:{port}/v1/chat/completions"
            return _drive_http(url, "m", proc.pid, conc, total, args)


def _drive_http(
    url: str,
    model: str,
    pid: int,
    conc: int,
    total: int,
    args: argparse.Namespace,
    token: str = "bench",
) -> dict[str, Any]:
    rep = c.run_loadgen(
        url, conc, total, model=model, max_seconds=args.max_seconds, token=token,
        warmup=max(conc, 50), server_pid=pid,
    )  # fmt: skip
    cpu = rep["server_cpu"]
    res = c.summarize(rep["latencies"], rep["elapsed"], cpu, rep["errors"])
    done = max(1, res["requests"])
    res["loadgen_cpu_us"] = rep["loadgen_cpu"] / done * 1e6
    res["loadgen_cpu_share"] = rep["loadgen_cpu"] / max(rep["elapsed"], 1e-9)
    if rep["overhead_ms"]:
        ov = sorted(rep["overhead_ms"])
        res["gateway_overhead_p50_ms"] = c.percentile(ov, 50)
        res["gateway_overhead_p99_ms"] = c.percentile(ov, 99)
    if rep["statuses"]:
        res["statuses"] = rep["statuses"]
    return res


def ensure_litellm(with_proxy: bool) -> tuple[bool, str]:
    """Create benchmarks/.venv-litellm and pip-install litellm (with the proxy extra
    when asked). Returns (ok, why-not)."""
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if not LITELLM_PY.exists():
        print("creating benchmarks/.venv-litellm ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", LITELLM_VENV], check=True)
    module = "litellm.proxy.proxy_server" if with_proxy else "litellm"
    probe = [LITELLM_PY, "-c", f"import {module}"]
    probe_env = {**env, **LITELLM_ENV}
    if subprocess.run(probe, capture_output=True, env=probe_env).returncode == 0:
        return True, ""
    spec = "litellm[proxy]" if with_proxy else "litellm"
    print(f"pip install {spec} into benchmarks/.venv-litellm ...", flush=True)
    r = subprocess.run(
        [LITELLM_PY, "-m", "pip", "install", "-q", spec], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        return False, f"pip install {spec} failed: {r.stderr.strip()[-300:]}"
    r = subprocess.run(probe, capture_output=True, text=True, env=probe_env)
    if r.returncode != 0:
        return False, f"import {module} failed: {r.stderr.strip()[-300:]}"
    return True, ""


def run_litellm(base: str, conc: int, total: int, args: argparse.Namespace) -> dict[str, Any]:
    argv = [
        LITELLM_PY, c.BENCH / "_litellm_worker.py", "--api-base", base,
        "--concurrency", str(conc), "--requests", str(total), "--warmup", str(max(conc, 50)),
        "--max-seconds", str(args.max_seconds),
    ]  # fmt: skip
    rep = c.run_json(argv, env={**os.environ, **LITELLM_ENV})
    res = c.summarize(rep["latencies"], rep["elapsed"], rep["cpu"], rep["errors"])
    res["version"] = rep["litellm"]
    if rep["first_error"]:
        res["first_error"] = rep["first_error"]
    return res


class LiteLLMProxy:
    """LiteLLM's proxy server (one uvicorn worker) on loopback, for all levels."""

    def __init__(self, base: str, tmp: Path) -> None:
        self.port = c.free_port()
        cfg = tmp / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            "  - model_name: m\n"
            "    litellm_params:\n"
            f"      model: openai/{c.UPSTREAM_MODEL}\n"
            f"      api_base: {base}\n"
            "      api_key: sk-bench\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  num_retries: 0\n"
        )
        self.argv = [
            LITELLM_VENV / "bin" / "litellm", "--config", cfg, "--host", "127.0.0.1",
            "--port", str(self.port), "--num_workers", "1",
        ]  # fmt: skip
        self.log = tmp / "litellm-proxy.log"
        # a fresh random master key per run (the proxy refuses to start without one)
        self.master_key = "sk-" + secrets.token_hex(32)
        self.env = {**os.environ, **LITELLM_ENV, "LITELLM_MASTER_KEY": self.master_key}
        self.env.pop("DATABASE_URL", None)


# ----------------------------------------------------------------------------- report


def levels_total(args: argparse.Namespace, conc: int) -> int:
    return max(args.requests, 2 * conc)


def build_markdown(payload: dict[str, Any]) -> str:
    meta, results = payload["meta"], payload["results"]
    levels = payload["levels"]
    lines = [
        "# Throughput against a local nginx upstream",
        "",
        f"Machine: {c.machine_line(meta)}. Upstream: nginx {meta.get('nginx', '')} on loopback "
        "(1 worker) returning a fixed OpenAI `chat.completion`. "
        f"{payload['requests']} requests per level (at least 2x the concurrency), after a "
        f"warm-up; a run stops after {payload['max_seconds']:g} s; best req/s of "
        f"{payload.get('repeat', 1)} run(s) per cell. LiteLLM "
        f"{meta.get('litellm', '?')}. Rerun: `{payload['command']}`.",
        "",
        "Configs: `raw` = one `httpx.AsyncClient` per "
        f'{payload["shard_size"]} concurrent callers; `router.submit` = `kind = "openai"`, '
        f"one key per {payload['shard_size']} callers (`max_concurrency = "
        f"{payload['shard_size']}` each, round robin); `router.submit, 1 key` = a single key "
        "with `max_concurrency = concurrency` (since commit 6137b46 the HTTP provider shards "
        "one key's connections over clients of 8 itself; before it, that key had one httpx "
        "pool of concurrency + 4 connections and measured 294 req/s at 64 and 181 at 256 on "
        "this machine, 0.3x and 0.2x raw); the gateway uses the `router.submit` config; "
        "LiteLLM uses its "
        "defaults (`num_retries = 0`). CPU is the process under test (for HTTP rows, the "
        "server's process tree); the load generator for HTTP rows is a separate trio process "
        "with one keep-alive connection per caller (its own CPU use is in the JSON).",
        "",
    ]
    headers = ["row", "concurrency", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "errors"]
    rows = []
    for row in payload["rows"]:
        for conc in levels:
            r = results.get(row, {}).get(str(conc))
            if r is None:
                continue
            if "skipped" in r:
                rows.append([LABELS[row], str(conc), "–", "–", "–", "–", r["skipped"][:120]])
                continue
            rows.append([
                LABELS[row], str(conc), c.fmt(r["rps"]), c.fmt(r["p50_ms"], 2),
                c.fmt(r["p99_ms"], 1), c.fmt(r["cpu_us"]), str(r["errors"]),
            ])  # fmt: skip
    lines += [c.markdown_table(headers, rows, "lrrrrrl"), ""]

    def get(row: str, conc: int, field: str) -> float | None:
        r = results.get(row, {}).get(str(conc))
        return None if r is None or "skipped" in r else r.get(field)

    lines += ["## Ratios (throughput, and p99 where lower is better)", ""]
    rrows = []
    for conc in levels:
        rrows.append([
            str(conc),
            c.ratio(get("router", conc, "rps"), get("raw", conc, "rps")),
            c.ratio(get("router-1key", conc, "rps"), get("raw", conc, "rps")),
            c.ratio(get("router", conc, "rps"), get("litellm", conc, "rps")),
            c.ratio(get("gateway", conc, "rps"), get("litellm-proxy", conc, "rps")),
            c.ratio(get("gateway", conc, "p99_ms"), get("litellm-proxy", conc, "p99_ms")),
            c.fmt(get("gateway", conc, "gateway_overhead_p50_ms"), 3),
        ])  # fmt: skip
    lines += [
        c.markdown_table(
            ["concurrency", "router / raw", "router 1 key / raw", "router / LiteLLM Router",
             "gateway / LiteLLM proxy", "gateway p99 / proxy p99",
             "gateway overhead p50 (ms, x-router-overhead-ms)"],
            rrows,
        ),
        "",
    ]  # fmt: skip
    crows = []
    for conc in levels:
        crows.append([
            str(conc),
            c.fmt(get("router", conc, "cpu_us")),
            c.ratio(get("raw", conc, "cpu_us"), get("router", conc, "cpu_us")),
            c.ratio(get("raw-transport", conc, "cpu_us"), get("router", conc, "cpu_us")),
            c.ratio(get("litellm", conc, "cpu_us"), get("router", conc, "cpu_us")),
            c.fmt(get("gateway", conc, "cpu_us")),
            c.ratio(get("litellm-proxy", conc, "cpu_us"), get("gateway", conc, "cpu_us")),
        ])  # fmt: skip
    lines += [
        "## CPU per request, side by side (how many times the router's CPU the peer spends)",
        "",
        c.markdown_table(
            ["concurrency", "router.submit µs", "raw httpx / router",
             "raw httpx on our transport / router", "LiteLLM Router / router",
             "gateway µs", "LiteLLM proxy / gateway"],
            crows,
        ),
        "",
    ]  # fmt: skip
    lines += ["## Targets", ""]
    lines += [c.markdown_table(["target", "measured", "status"], payload["targets"], "lll"), ""]
    for note in payload.get("notes", []):
        lines += [note, ""]
    prof = payload.get("profile")
    if prof:
        lines += [
            f"## Profile: router.submit over HTTP at {prof['concurrency']} concurrent requests",
            "",
            f"pyinstrument, sampling the trio thread every 1 ms for {prof['duration']:.1f} s "
            f"({prof['samples']} samples; {c.fmt(prof['rps'])} req/s while profiled). Share "
            "of the process's samples by component:",
            "",
            c.markdown_table(
                ["component", "% of samples"],
                [[k, f"{v:.1f}"] for k, v in prof["components"]],
            ),
            "",
            "Top functions by self time:",
            "",
            c.markdown_table(
                ["function", "% self"], [[f"`{k}`", f"{v:.1f}"] for k, v in prof["functions"]]
            ),
            "",
            "<details><summary>call tree (pyinstrument, short mode)</summary>",
            "",
            "```",
            prof["tree"].strip(),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += ["![throughput and p99 against concurrency](throughput.png)", ""]
    return "\n".join(lines)


def evaluate_targets(payload: dict[str, Any]) -> list[list[str]]:
    results = payload["results"]

    def get(row: str, conc: int, field: str) -> float | None:
        r = results.get(row, {}).get(str(conc))
        return None if r is None or "skipped" in r else r.get(field)

    targets: list[list[str]] = []

    def at_most(label: str, value: float | None, limit: float) -> None:
        """A CPU µs ceiling."""
        if value:
            targets.append([label, f"{value:,.0f} µs", "met" if value <= limit else "not met"])

    def times_less(label: str, theirs: float | None, ours: float | None, factor: float) -> None:
        """Ours at least `factor` times less CPU than theirs."""
        if theirs and ours:
            targets.append([
                label, f"{theirs:,.0f} / {ours:,.0f} µs = {theirs / ours:.1f}x",
                "met" if theirs / ours >= factor else "not met",
            ])  # fmt: skip

    r64, g64 = get("router", 64, "cpu_us"), get("gateway", 64, "cpu_us")
    at_most("router.submit over HTTP at 64: ≤ 300 µs CPU/request (#13)", r64, 300)
    times_less(
        "router.submit ≥ 3x less CPU than raw httpx at 64 (#13)", get("raw", 64, "cpu_us"), r64, 3
    )
    times_less(
        "router.submit ≥ 20x less CPU than LiteLLM Router at 64 (#13)",
        get("litellm", 64, "cpu_us"), r64, 20,
    )  # fmt: skip
    at_most("gateway at 64: ≤ 1,000 µs CPU/request (#13)", g64, 1000)
    times_less(
        "gateway ≥ 10x less CPU than LiteLLM's proxy at 64 (#13)",
        get("litellm-proxy", 64, "cpu_us"), g64, 10,
    )  # fmt: skip
    overhead = c.RESULTS / "overhead.json"
    if overhead.exists():
        rows = json.loads(overhead.read_text())["rows"]
        at1000 = next((r for r in rows if r["callers"] == 1000), None)
        if at1000:
            v = at1000["overhead_us"]
            targets.append([
                "in-process overhead < 25 µs at 1,000 callers (overhead.py)",
                f"{v:.1f} µs", "met" if v < 25 else "not met",
            ])  # fmt: skip
    for conc in (64, 256):
        a, b = get("router", conc, "rps"), get("raw", conc, "rps")
        if a and b:
            targets.append([
                f"router.submit ≥ 0.9x raw sharded httpx at {conc}",
                f"{a:,.0f} / {b:,.0f} req/s = {a / b:.2f}x", "met" if a / b >= 0.9 else "not met",
            ])  # fmt: skip
    a, b = get("router", 64, "rps"), get("litellm", 64, "rps")
    if a and b:
        targets.append([
            "router.submit ≥ 7x LiteLLM Router at 64",
            f"{a:,.0f} / {b:,.0f} req/s = {a / b:.1f}x", "met" if a / b >= 7 else "not met",
        ])  # fmt: skip
    ov = get("gateway", 64, "gateway_overhead_p50_ms")
    if ov is not None:
        targets.append([
            "gateway overhead < 1 ms at p50 at 64 (x-router-overhead-ms)",
            f"{ov:.3f} ms", "met" if ov < 1 else "not met",
        ])  # fmt: skip
    for conc in payload["levels"]:
        g, p = get("gateway", conc, "rps"), get("litellm-proxy", conc, "rps")
        g99, p99 = get("gateway", conc, "p99_ms"), get("litellm-proxy", conc, "p99_ms")
        if g and p and g99 and p99:
            ok = g > p and g99 < p99
            targets.append([
                f"gateway ahead of LiteLLM proxy at {conc} (req/s and p99)",
                f"{g / p:.2f}x req/s, p99 {g99:,.1f} vs {p99:,.1f} ms",
                "met" if ok else "not met",
            ])  # fmt: skip
    return targets


def explain(payload: dict[str, Any]) -> list[str]:
    """Notes on why unmet targets are not met, from the measurements."""
    results = payload["results"]
    unmet = {t[0] for t in payload.get("targets", []) if t[2] != "met"}

    def g(row: str, level: int, field: str) -> float:
        r = results.get(row, {}).get(str(level), {})
        return float(r.get(field, math.nan))

    notes = ["### Why the unmet targets are not met"]
    if any(t.startswith("gateway overhead") for t in unmet):
        cpu, rps = g("gateway", 64, "cpu_us"), g("gateway", 64, "rps")
        notes.append(
            "- **gateway overhead < 1 ms at p50 at 64.** This closed loop keeps the gateway "
            f"process CPU-saturated ({cpu:,.0f} µs CPU per request at {rps:,.0f} req/s ≈ "
            f"{cpu * rps / 1e4:.0f}% of a core), so requests wait for the event loop between "
            "Hypercorn reading them and the router sending them upstream, and that wait "
            "counts as overhead. `scaling.py --sections gateway_overhead` measures the "
            "overhead of a gateway that is not saturated."
        )
    if "gateway" in results:
        errs = sum(r.get("errors", 0) for r in results["gateway"].values())
        if errs:
            notes.append(
                f"- The gateway rows saw {errs} transport error(s) in the load generator "
                "(connection closed by the server without a status); not investigated."
            )
    return notes if len(notes) > 1 else []


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=ROWS)
    parser.add_argument("--requests", type=int, default=2000, help="per level (min 2x level)")
    parser.add_argument("--max-seconds", type=float, default=15.0, help="cap per run")
    parser.add_argument("--shard-size", type=int, default=8, help="callers per client / key")
    parser.add_argument("--profile-level", type=int, default=64, help="0: no profile")
    parser.add_argument("--output", default="throughput", help="results file stem")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per row and level; the best req/s is kept"
    )
    # internal: one in-process row at one level
    parser.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(trio.run(_worker, args)))
        return

    meta = c.machine()
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    meta["nginx"] = nginx_v.stderr.strip().split("/")[-1]
    payload: dict[str, Any] = {
        "meta": meta,
        "command": "python benchmarks/throughput.py " + " ".join(sys.argv[1:]),
        "levels": args.levels,
        "rows": args.rows,
        "requests": args.requests,
        "max_seconds": args.max_seconds,
        "shard_size": args.shard_size,
        "repeat": args.repeat,
        "results": {},
        "notes": [],
    }
    results: dict[str, dict[str, Any]] = payload["results"]

    def record(row: str, conc: int, res: dict[str, Any]) -> None:
        results.setdefault(row, {})[str(conc)] = res
        if "skipped" in res:
            print(f"{LABELS[row]:24s} {conc:5d}  skipped: {res['skipped'][:200]}", flush=True)
            return
        print(
            f"{LABELS[row]:24s} {conc:5d}  {res['rps']:8.0f} req/s  p50 {res['p50_ms']:8.2f} ms"
            f"  p99 {res['p99_ms']:8.1f} ms  cpu {res['cpu_us']:7.0f} us/req  "
            f"errors {res['errors']}",
            flush=True,
        )

    with c.nginx_upstream() as base, tempfile.TemporaryDirectory(prefix="bench-") as tmpdir:
        tmp = Path(tmpdir)
        for row in args.rows:
            if row.startswith("litellm"):
                ok, why = ensure_litellm(with_proxy=row == "litellm-proxy")
                if not ok:
                    for conc in args.levels:
                        record(row, conc, {"skipped": why})
                    continue
            if row == "litellm-proxy":
                proxy = LiteLLMProxy(base, tmp)
                try:
                    with c.spawned(proxy.argv, env=proxy.env, log=proxy.log, grace=5) as proc:
                        c.wait_port(proxy.port, proc, 120)
                        url = f"http://127.0.0.1:{proxy.port}/chat/completions"
                        for conc in args.levels:
                            total = levels_total(args, conc)
                            res = _drive_http(
                                url, "m", proc.pid, conc, total, args, proxy.master_key
                            )
                            record(row, conc, res)
                except Exception as exc:
                    log_tail = proxy.log.read_text(errors="replace")[-400:]
                    why = f"proxy failed: {exc}; log: {log_tail}".replace("\n", " ")
                    for conc in args.levels:
                        results.setdefault(row, {}).setdefault(str(conc), {"skipped": why})
                    print(why, file=sys.stderr)
                continue
            if row not in ("litellm",):
                continue  # run below, in alternating blocks
            for conc in args.levels:
                total = levels_total(args, conc)
                try:
                    runs_l = []
                    for _ in range(args.repeat):
                        runs_l.append(run_litellm(base, conc, total, args))
                        meta["litellm"] = runs_l[-1].pop("version")
                    res = max(runs_l, key=lambda r: r["rps"])
                    res["runs_rps"] = [round(r["rps"]) for r in runs_l]
                    res["cpu_us"] = statistics.median(r["cpu_us"] for r in runs_l)
                except Exception as exc:
                    traceback.print_exc()
                    res = {"skipped": f"failed: {exc}".replace("\n", " ")}
                record(row, conc, res)
        # In-process and gateway rows run in alternating blocks (every row once, then
        # every row again, `--repeat` times), so a slow minute of the shared machine
        # falls on all rows alike; a cell reports its best req/s run and the median CPU.
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        blocked = [r for r in args.rows if not r.startswith("litellm")]
        for _ in range(args.repeat):
            for row in blocked:
                for conc in args.levels:
                    total = levels_total(args, conc)
                    try:
                        if row in ("raw", "raw-transport", "router", "router-1key"):
                            one = run_inprocess(row, base, conc, total, args)
                        elif row == "hypercorn":
                            one = run_hypercorn(conc, total, args)
                        else:
                            one = run_gateway(base, conc, total, args)
                    except Exception as exc:
                        traceback.print_exc()
                        one = {"skipped": f"failed: {exc}".replace("\n", " ")}
                    runs.setdefault((row, conc), []).append(one)
        for (row, conc), done in runs.items():
            ok = [r for r in done if "skipped" not in r]
            if not ok:
                record(row, conc, done[0])
                continue
            res = dict(max(ok, key=lambda r: r["rps"]))
            res["runs_rps"] = [round(r["rps"]) for r in ok]
            res["runs_cpu_us"] = [round(r["cpu_us"]) for r in ok]
            res["cpu_us"] = statistics.median(r["cpu_us"] for r in ok)
            record(row, conc, res)
        if args.profile_level and "router" in args.rows:
            conc = args.profile_level
            print(f"profiling router.submit at {conc} ...", flush=True)
            res = run_inprocess("router", base, conc, levels_total(args, conc), args, True)
            payload["profile"] = {"concurrency": conc, "rps": res["rps"], **res["profile"]}

    payload["targets"] = evaluate_targets(payload)
    payload["notes"] = explain(payload)
    c.write_results(args.output, payload, build_markdown(payload))
    series = {
        LABELS[row]: [
            (conc, r["rps"], r["p99_ms"])
            for conc in args.levels
            if (r := results.get(row, {}).get(str(conc))) and "skipped" not in r
        ]
        for row in args.rows
    }
    c.plot_series(
        args.output,
        f"Throughput and p99 vs concurrency (nginx upstream, {meta['cpus']} cores)",
        series,
    )
    print(f"wrote {c.RESULTS / args.output}.{{json,md,png}}")


if __name__ == "__main__":
    main()
