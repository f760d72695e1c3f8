"""The `llm-router demo` command: a burst of requests through simulated providers.

`run_demo()` opens a `Router` on a config (by default the embedded `demo.toml`: three
simulated providers, one flaky key, one rate-limited key and one provider that is down),
submits `requests` chat requests cycling over the models "fast", "smart" and "cheap",
at most `concurrency` at once, and counts each request's one outcome: a response (by
the model and key that served it) or a `RouterError` (by its kind). While it runs it
shows the router's key and model state: a table redrawn in place on a terminal, or a
compact progress line every second on anything else. Each key shows its own state
(what stops every model of the key) or, when that is fine, its worst lane (one
upstream model on the key: a rate-limit cooldown or that model's breaker). At the end
it prints a summary and returns it as a `DemoSummary`.

`main()` is the command line (`llm-router demo`, `python -m router demo`); `add_arguments()`
and `run_command()` let `router.__main__` mount it as a subcommand.
"""

from __future__ import annotations

import argparse
import math
import random
import socket
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Final, TextIO

import msgspec
import trio

from ._config import RouterConfig, SimulationConfig
from ._errors import (
    ChainExhaustedError,
    ConfigError,
    DeadlineExceededError,
    ProviderError,
    RouterError,
)
from ._router import KeySnapshot, LaneSnapshot, Router, RouterSnapshot
from ._types import Attempt, ChatRequest, ChatResponse, Message
from .emulator import Fault

__all__ = [
    "DEFAULT_CONCURRENCY",
    "DEFAULT_REQUESTS",
    "MODELS",
    "DemoSummary",
    "add_arguments",
    "load_config",
    "main",
    "run_command",
    "run_demo",
]

MODELS: Final = ("fast", "smart", "cheap")
"""The models the demo's requests ask for, in turn."""
DEFAULT_REQUESTS: Final = 1500
DEFAULT_CONCURRENCY: Final = 100
LIVE_INTERVAL: Final = 0.25
"""Seconds between redraws of the live table (on a terminal)."""
PROGRESS_INTERVAL: Final = 1.0
"""Seconds between progress lines (when the output is not a terminal)."""

_COOLING_OUTCOMES: Final = frozenset({"rate_limit", "auth", "balance"})


@dataclass(frozen=True, slots=True)
class DemoSummary:
    """What a demo run did. Latencies and `wall_time` are in seconds on the router's
    clock (real time, or virtual time under a mock clock)."""

    requests: int
    successes: int
    errors_by_kind: Mapping[str, int]
    """Requests that ended in a `RouterError`, by its `.kind`."""
    served_by_model: Mapping[str, int]
    """Successes by the model that served them (which may be a fallback)."""
    served_by_key: Mapping[str, int]
    """Successes by ``provider/key``."""
    failovers: int
    """Responses that took more than one attempt or came from a fallback model."""
    fallback_served: int
    """Responses served by a model other than the one requested."""
    p50: float
    p99: float
    wall_time: float
    cooldowns_by_key: Mapping[str, int]
    """Attempts that put ``provider/key`` (auth, balance) or one of its lanes (rate
    limit) into cooldown."""
    opens_by_key: Mapping[str, int]
    """Times the breakers of each ``provider/key`` opened, the key's own and its
    lanes' together, from the router's final snapshot."""
    keys: tuple[KeySnapshot, ...]
    """Every key's state at the end of the run."""

    @property
    def errors(self) -> int:
        return sum(self.errors_by_kind.values())


class _Tally:
    """Outcome counters, written by the worker tasks (trio is single-threaded)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.done = 0
        self.successes = 0
        self.errors: Counter[str] = Counter()
        self.served_by_model: Counter[str] = Counter()
        self.served_by_key: Counter[str] = Counter()
        self.cooldowns: Counter[str] = Counter()
        self.failovers = 0
        self.fallback_served = 0
        self.latencies: list[float] = []

    def _count_attempts(self, attempts: Sequence[Attempt]) -> None:
        for a in attempts:
            if a.outcome in _COOLING_OUTCOMES:
                self.cooldowns[f"{a.provider}/{a.key_id}"] += 1

    def on_response(self, requested: str, response: ChatResponse, latency: float) -> None:
        self.done += 1
        self.successes += 1
        self.latencies.append(latency)
        self.served_by_model[response.model] += 1
        self.served_by_key[f"{response.provider}/{response.key_id}"] += 1
        fallback = response.model != requested
        self.fallback_served += fallback
        if fallback or len(response.attempts) > 1:
            self.failovers += 1
        self._count_attempts(response.attempts)

    def on_error(self, error: RouterError, latency: float) -> None:
        self.done += 1
        self.latencies.append(latency)
        self.errors[error.kind] += 1
        if isinstance(error, ChainExhaustedError | DeadlineExceededError | ProviderError):
            self._count_attempts(error.attempts)


def _percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (0.0 for none)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(pct / 100.0 * len(sorted_values)))
    return sorted_values[rank - 1]


# -- the run -------------------------------------------------------------------------------


async def run_demo(
    config: RouterConfig, *, requests: int, concurrency: int, live: bool, out: TextIO
) -> DemoSummary:
    """Run the demo burst on `config` and print its progress and summary to `out`."""
    if requests < 1:
        raise ValueError(f"requests must be at least 1, got {requests}")
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency}")
    tally = _Tally(requests)
    tty = live and out.isatty()
    start = trio.current_time()
    real_start = time.perf_counter()
    async with Router.open(config) as router:
        async with trio.open_nursery() as nursery:
            if live:
                show = _LiveTable(router, tally, out, start) if tty else None
                if show is not None:
                    nursery.start_soon(show.run)
                else:
                    nursery.start_soon(_progress, router, tally, out, start)
            async with trio.open_nursery() as workers:
                indices = iter(range(requests))
                for _ in range(min(concurrency, requests)):
                    workers.start_soon(_worker, router, indices, tally)
            nursery.cancel_scope.cancel()
        wall = trio.current_time() - start
        final = router.snapshot()
        if tty:
            _LiveTable(router, tally, out, start).draw(final)
    real = time.perf_counter() - real_start
    latencies = sorted(tally.latencies)
    summary = DemoSummary(
        requests=requests,
        successes=tally.successes,
        errors_by_kind=dict(sorted(tally.errors.items())),
        served_by_model=dict(tally.served_by_model.most_common()),
        served_by_key=dict(tally.served_by_key.most_common()),
        failovers=tally.failovers,
        fallback_served=tally.fallback_served,
        p50=_percentile(latencies, 50),
        p99=_percentile(latencies, 99),
        wall_time=wall,
        cooldowns_by_key=dict(tally.cooldowns.most_common()),
        opens_by_key={f"{k.provider}/{k.key_id}": _opens(k) for k in final.keys},
        keys=tuple(final.keys),
    )
    out.write(_format_summary(summary, final, concurrency, max(latencies), real))
    out.flush()
    return summary


async def run_http_demo(
    config: RouterConfig, *, requests: int, concurrency: int, live: bool, out: TextIO
) -> DemoSummary:
    """The demo over real HTTP: the simulated providers of `config` become OpenAI,
    Anthropic and Gemini providers served by the loopback emulator, with each key's
    fault mix turned into the emulator's script for that key."""
    from .emulator import Emulator

    async with Emulator.serve(port=0) as emu:
        http_config, scripts = over_http(config, emu.url, _closed_port_url(), requests)
        for secret, faults in scripts.items():
            emu.script(faults, key=secret)
        out.write(f"emulator at {emu.url}\n")
        return await run_demo(
            http_config, requests=requests, concurrency=concurrency, live=live, out=out
        )


_HTTP_KINDS: Final = ("openai", "anthropic", "gemini")


def _closed_port_url() -> str:
    """A loopback URL nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    return f"http://127.0.0.1:{port}"


def over_http(
    config: RouterConfig, emulator_url: str, refused_url: str, requests: int
) -> tuple[RouterConfig, dict[str, list[Fault]]]:
    """`config` with its simulated providers turned into HTTP kinds (in turn openai,
    anthropic, gemini) at `emulator_url`, and for each key secret the emulator faults
    that reproduce its simulated fault mix (a provider that is `down` points at
    `refused_url`)."""
    providers = []
    scripts: dict[str, list[Fault]] = {}
    for index, provider in enumerate(config.providers):
        if provider.kind != "simulated":
            providers.append(provider)
            continue
        kind = _HTTP_KINDS[index % len(_HTTP_KINDS)]
        default = provider.simulate or SimulationConfig()
        keys = []
        for key in provider.keys:
            secret = f"demo-{provider.name}-{key.id}"
            sim = key.simulate or default
            rng = random.Random(f"{provider.seed}:{provider.name}:{key.id}")
            scripts[secret] = [_fault(sim, rng) for _ in range(requests * 3)]
            keys.append(msgspec.structs.replace(key, secret=secret, simulate=None))
        base = refused_url if default.down else emulator_url
        providers.append(
            msgspec.structs.replace(
                provider,
                kind=kind,
                base_url=f"{base}/v1" if kind == "openai" else base,
                simulate=None,
                keys=keys,
            )
        )
    http_config = msgspec.structs.replace(config, providers=providers)
    http_config.validate()
    return http_config, scripts


def _fault(sim: SimulationConfig, rng: random.Random) -> Fault:
    """One call's fault drawn from a simulated key's mix (the same order as the
    simulated provider's)."""
    u = rng.random()
    latency = sim.latency + sim.jitter * rng.random()
    table: list[tuple[float, Fault]] = [
        (sim.transient, Fault(status=503, latency=latency)),
        (
            sim.rate_limit,
            Fault(status=429, latency=latency, headers={"retry-after": f"{sim.retry_after:g}"}),
        ),
        (sim.auth, Fault(status=401, latency=latency)),
        (sim.balance, Fault(status=402, latency=latency)),
        (sim.model_missing, Fault(status=404, latency=latency)),
        (sim.hang, Fault(hang=True)),
        (sim.unknown, Fault(status=418, latency=latency)),
    ]
    edge = 0.0
    for p, fault in table:
        edge += p
        if u < edge:
            return fault
    return Fault(latency=latency)


async def _worker(router: Router, indices: Iterator[int], tally: _Tally) -> None:
    # `indices` is shared by every worker: each takes the next request number.
    for i in indices:
        model = MODELS[i % len(MODELS)]
        request = ChatRequest(
            model=model, messages=[Message("user", f"demo request #{i}: say hello in one line")]
        )
        t0 = trio.current_time()
        try:
            response = await router.submit(request)
        except RouterError as exc:
            tally.on_error(exc, trio.current_time() - t0)
        else:
            tally.on_response(model, response, trio.current_time() - t0)


# -- showing the state ---------------------------------------------------------------------

_RESET: Final = "\x1b[0m"
_RED: Final = "\x1b[31m"
_YELLOW: Final = "\x1b[33m"
_GREEN: Final = "\x1b[32m"
_DIM: Final = "\x1b[2m"


def _paint(text: str, color: str | None) -> str:
    return f"{color}{text}{_RESET}" if color else text


_BREAKER_RANK: Final = {"open": 2, "half_open": 1}


def _opens(k: KeySnapshot) -> int:
    """Times any breaker of the key opened: its own or one of its lanes'."""
    return k.opens + sum(lane.opens for lane in k.lanes)


def _key_is_fine(k: KeySnapshot) -> bool:
    """The key's own state stops nothing: breaker closed, not cooling."""
    return k.breaker == "closed" and k.cooling_for <= 0


def _worst_breaker_lane(k: KeySnapshot) -> LaneSnapshot | None:
    """The lane whose breaker is furthest from closed (open before half-open, then the
    longest open), or None when every lane's breaker is closed."""
    tripped = [lane for lane in k.lanes if lane.breaker != "closed"]
    if not tripped:
        return None
    return max(tripped, key=lambda n: (_BREAKER_RANK.get(n.breaker, 2), n.breaker_open_for))


def _worst_cooling_lane(k: KeySnapshot) -> LaneSnapshot | None:
    """The lane that cools longest, or None when no lane cools."""
    cooling = [lane for lane in k.lanes if lane.cooling_for > 0]
    return max(cooling, key=lambda n: n.cooling_for) if cooling else None


def _breaker_text(state: str, open_for: float) -> tuple[str, str | None]:
    if state == "open":
        return f"open {open_for:.1f}s", _RED
    if state == "half_open":
        return "half-open", _YELLOW
    return state, _GREEN


def _breaker_cell(k: KeySnapshot) -> tuple[str, str | None]:
    """The key's own breaker or, while the key's own state is fine, its worst lane's
    (named by the lane's model)."""
    if not _key_is_fine(k):
        return _breaker_text(k.breaker, k.breaker_open_for)
    lane = _worst_breaker_lane(k)
    if lane is None:
        return _breaker_text("closed", 0.0)
    text, color = _breaker_text(lane.breaker, lane.breaker_open_for)
    return f"{text} ({lane.model})", color


def _cooling_cell(k: KeySnapshot) -> tuple[str, str | None]:
    """The key's own cooldown or, while the key's own state is fine, its longest lane
    cooldown (a rate limit of one model, named)."""
    if not _key_is_fine(k):
        if k.cooling_for > 0:
            return f"{k.cooling_for:.1f}s {k.cooling_reason or ''}".rstrip(), _YELLOW
        return "-", _DIM
    lane = _worst_cooling_lane(k)
    if lane is None:
        return "-", _DIM
    return f"{lane.cooling_for:.1f}s rate_limit ({lane.model})", _YELLOW


def _key_rows(snap: RouterSnapshot, color: bool) -> list[str]:
    cells = [(k, _breaker_cell(k), _cooling_cell(k)) for k in snap.keys]
    b_width = max([11, *(len(b[0]) for _, b, _ in cells)])
    c_width = max([16, *(len(c[0]) for _, _, c in cells)])
    head = (
        f"{'provider':<9} {'key':<10} {'breaker':<{b_width}} {'cooling':<{c_width}} "
        f"{'in_flight':>9} {'queued':>6} {'requests':>8} {'failures':>8} {'opens':>5}"
    )
    rows = [head]
    for k, (b_text, b_color), (c_text, c_color) in cells:
        breaker = _paint(f"{b_text:<{b_width}}", b_color if color else None)
        cooling = _paint(f"{c_text:<{c_width}}", c_color if color else None)
        rows.append(
            f"{k.provider:<9} {k.key_id:<10} {breaker} {cooling} "
            f"{k.in_flight:>9} {k.queued:>6} {k.requests:>8} {k.failures:>8} {_opens(k):>5}"
        )
    return rows


def _model_rows(snap: RouterSnapshot, color: bool) -> list[str]:
    rows = [f"{'model':<9} {'route':<20} {'health':<10} {'for':>6}"]
    for m in snap.models:
        paint = {"healthy": _GREEN, "cooling": _YELLOW, "disabled": _RED}.get(m.health)
        health = _paint(f"{m.health:<10}", paint if color else None)
        remaining = f"{m.remaining:.1f}s" if m.remaining > 0 else "-"
        rows.append(f"{m.name:<9} {m.provider + '/' + m.upstream:<20} {health} {remaining:>6}")
    return rows


def _progress_head(tally: _Tally, elapsed: float) -> str:
    errors = sum(tally.errors.values())
    return (
        f"[{elapsed:6.2f}s] {tally.done}/{tally.total} done | {tally.successes} ok | "
        f"{errors} errors | {tally.failovers} failovers"
    )


class _LiveTable:
    """Redraws the key and model table in place (ANSI cursor movement)."""

    def __init__(self, router: Router, tally: _Tally, out: TextIO, start: float) -> None:
        self.router = router
        self.tally = tally
        self.out = out
        self.start = start
        self.lines = 0

    def draw(self, snap: RouterSnapshot) -> None:
        rows = [
            _progress_head(self.tally, snap.time - self.start),
            "",
            *_key_rows(snap, color=True),
            "",
            *_model_rows(snap, color=True),
        ]
        # Back to the first line of the previous drawing, clear to the end of the screen.
        prefix = f"\x1b[{self.lines}F\x1b[J" if self.lines else ""
        self.out.write(prefix + "\n".join(rows) + "\n")
        self.out.flush()
        self.lines = len(rows)

    async def run(self) -> None:
        while True:
            self.draw(self.router.snapshot())
            await trio.sleep(LIVE_INTERVAL)


async def _progress(router: Router, tally: _Tally, out: TextIO, start: float) -> None:
    """One compact line a second: counts, load, and what is open or cooling."""
    while True:
        await trio.sleep(PROGRESS_INTERVAL)
        snap = router.snapshot()
        in_flight = sum(k.in_flight for k in snap.keys)
        queued = sum(k.queued for k in snap.keys)
        parts = [_progress_head(tally, snap.time - start), f"in flight {in_flight}/q {queued}"]
        tripped = []
        cooling = []
        for k in snap.keys:
            name = f"{k.provider}/{k.key_id}"
            b_text, _ = _breaker_cell(k)
            if b_text != "closed":
                tripped.append(f"{name} {b_text}")
            c_text, _ = _cooling_cell(k)
            if c_text != "-":
                cooling.append(f"{name} {c_text}")
        if tripped:
            parts.append("breaker: " + ", ".join(tripped))
        if cooling:
            parts.append("cooling: " + ", ".join(cooling))
        unwell = [f"{m.name} {m.health}" for m in snap.models if m.health != "healthy"]
        if unwell:
            parts.append("model " + ", ".join(unwell))
        out.write(" | ".join(parts) + "\n")
        out.flush()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _format_summary(
    s: DemoSummary, final: RouterSnapshot, concurrency: int, max_latency: float, real: float
) -> str:
    rate = s.requests / s.wall_time if s.wall_time > 0 else math.inf
    lines = [
        "",
        f"llm-router demo: {s.requests} requests over {', '.join(MODELS)}, "
        f"concurrency {concurrency}",
        f"  wall time   {s.wall_time:.2f} s router clock ({rate:.0f} req/s), {real:.2f} s real",
        f"  successes   {s.successes} ({100.0 * s.successes / s.requests:.1f}%)",
    ]
    if s.errors_by_kind:
        kinds = ", ".join(f"{k} {n}" for k, n in s.errors_by_kind.items())
        lines.append(f"  errors      {s.errors} ({kinds})")
    else:
        lines.append("  errors      0")
    lines += [
        f"  failovers   {s.failovers} responses took more than one attempt or a fallback "
        f"model ({s.fallback_served} served by a fallback model)",
        f"  latency     p50 {_ms(s.p50)}, p99 {_ms(s.p99)}, max {_ms(max_latency)}",
        "",
        "served by model: "
        + (", ".join(f"{m} {n}" for m, n in s.served_by_model.items()) or "none"),
    ]
    states = [(k, _breaker_cell(k)[0], _cooling_cell(k)[0]) for k in final.keys]
    width = max([11, *(len(b) for _, b, _ in states)])
    lines += [
        "",
        f"{'provider/key':<16} {'served':>6} {'attempts':>8} {'failures':>8} "
        f"{'cooldowns':>9} {'opens':>5}  {'breaker now':<{width}}  cooling now",
    ]
    for k, breaker, cooling in states:
        name = f"{k.provider}/{k.key_id}"
        row = (
            f"{name:<16} {s.served_by_key.get(name, 0):>6} {k.requests:>8} {k.failures:>8} "
            f"{s.cooldowns_by_key.get(name, 0):>9} {_opens(k):>5}  {breaker:<{width}}  {cooling}"
        )
        lines.append(row.rstrip())
    lines += [
        "",
        "(model): the worst lane (that model on the key), shown when the key's own state "
        "is fine; opens: the key's breaker and its lanes'",
        "",
    ]
    return "\n".join(lines)


# -- the command line ----------------------------------------------------------------------


def load_config(path: str | None) -> RouterConfig:
    """The config at `path`, or the embedded demo config when `path` is None."""
    if path is None:
        text = resources.files("router").joinpath("demo.toml").read_bytes()
        return RouterConfig.from_toml(text)
    return RouterConfig.load(path)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to `parser` (its own or a subcommand's)."""
    parser.add_argument(
        "--config",
        metavar="PATH",
        default=None,
        help="router config (.toml or .json); default: the embedded demo config",
    )
    parser.add_argument(
        "--requests",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_REQUESTS,
        help=f"requests to submit (default {DEFAULT_REQUESTS})",
    )
    parser.add_argument(
        "--concurrency",
        metavar="N",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"requests in flight at most (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument(
        "--http",
        action="store_true",
        help="run the providers over real HTTP: OpenAI, Anthropic and Gemini APIs served by "
        "the loopback emulator, with the same fault mix",
    )
    parser.add_argument(
        "--no-live",
        action="store_true",
        help="no live table or progress lines, only the final summary",
    )


def run_command(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run the demo from parsed arguments; returns the exit status."""
    stream = out if out is not None else sys.stdout
    try:
        config = load_config(args.config)
        trio.run(
            partial(
                run_http_demo if args.http else run_demo,
                config,
                requests=args.requests,
                concurrency=args.concurrency,
                live=not args.no_live,
                out=stream,
            )
        )
    except ConfigError as exc:
        print(f"llm-router demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm-router demo: interrupted", file=sys.stderr)
        return 130
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`llm-router demo [options]`, with `argv` the options after ``demo``."""
    parser = argparse.ArgumentParser(
        prog="llm-router demo",
        description="Send a burst of requests through simulated providers and show failover.",
    )
    add_arguments(parser)
    return run_command(parser.parse_args(argv))
