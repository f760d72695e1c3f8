"""Running the gateway: one `Router` per process, opened around Hypercorn's trio worker
in the same trio run, and the `serve` / `check` commands of the CLI.

Shutdown (SIGTERM or SIGINT, or `shutdown_trigger` returning): Hypercorn stops
accepting, idle keep-alive connections close, in-flight requests get
`gateway.shutdown_grace` seconds to finish; then the router closes and `serve` returns.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from functools import partial

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

from .._chain import ModelChain
from .._config import ProviderConfig, RouterConfig, resolve_secret
from .._errors import ConfigError
from .._provider import Provider
from .._router import Router
from ._app import GatewayApp

__all__ = ["add_check_arguments", "add_serve_arguments", "check_command", "serve", "serve_command"]

log = logging.getLogger("router.gateway")


async def serve(
    config: RouterConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    providers: Mapping[str, Provider] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until `shutdown_trigger` returns (forever when None).

    `task_status.started` gets the bound URLs (``http://127.0.0.1:PORT``), so
    ``await nursery.start(partial(serve, config, port=0))`` tells the free port chosen.
    """
    gw = config.gateway
    app = GatewayApp(config)  # resolves the gateway secrets first: a bad one fails fast
    hc = HypercornConfig()
    bind_host = host if host is not None else gw.host
    bind_port = port if port is not None else gw.port
    hc.bind = [f"[{bind_host}]:{bind_port}" if ":" in bind_host else f"{bind_host}:{bind_port}"]
    hc.graceful_timeout = gw.shutdown_grace
    hc.accesslog = None
    hc.errorlog = logging.getLogger("router.gateway.hypercorn")
    hc.keep_alive_timeout = 30.0
    async with Router.open(config, providers) as router:
        app.router = router
        try:
            async with trio.open_nursery() as nursery:
                binds: list[str] = await nursery.start(
                    partial(hypercorn_serve, app, hc, shutdown_trigger=shutdown_trigger)  # type: ignore[arg-type]
                )
                task_status.started(binds)
        finally:
            app.accepting = False
            app.router = None


# ---------------------------------------------------------------------- CLI


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="router config (TOML or JSON)")
    parser.add_argument("--host", default=None, help="bind address (default: [gateway] host)")
    parser.add_argument(
        "--port",
        type=int,
        default=None,
        help="bind port, 0 for any free one (default: [gateway] port)",
    )
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="router config (TOML or JSON)")


async def _serve_until_signal(config: RouterConfig, host: str | None, port: int | None) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def on_signal() -> None:
            async for signum in signals:
                log.info("received %s: draining", signal.Signals(signum).name)
                return

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, config, host=host, port=port, shutdown_trigger=on_signal)
            )
            for url in binds:
                print(f"llm-router gateway listening on {url}", flush=True)
    log.info("gateway stopped")


def serve_command(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # httpx logs every upstream URL at INFO: keep it (and anything it might carry) out.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    try:
        config = RouterConfig.load(args.config)
        trio.run(_serve_until_signal, config, args.host, args.port)
    except ConfigError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"llm-router: cannot serve: {exc}", file=sys.stderr)
        return 1
    return 0


def _mask(raw: str) -> str:
    if not raw:
        return "(none)"
    if raw.startswith("env:"):
        return raw  # the variable's name, never its value
    return "***"


def check_command(args: argparse.Namespace) -> int:
    """Validate a config and print every model's resolved chain, secrets masked."""
    out = sys.stdout
    try:
        config = RouterConfig.load(args.config)
        # Every secret must resolve, as `serve` would need it (values are never printed).
        for i, p in enumerate(config.providers):
            for j, k in enumerate(p.keys):
                if k.secret:
                    resolve_secret(k.secret, f"providers[{i}].keys[{j}].secret")
        gw = config.gateway
        for i, gk in enumerate(gw.api_keys):
            resolve_secret(gk.secret, f"gateway.api_keys[{i}].secret")
        if gw.admin_key:
            resolve_secret(gw.admin_key, "gateway.admin_key")
        providers: dict[str, ProviderConfig] = {p.name: p for p in config.providers}
        chain: ModelChain[ProviderConfig] = ModelChain(config, providers)
        lines = [f"config {args.config}: ok", "", "providers:"]
        for p in config.providers:
            where = f" {p.base_url}" if p.base_url else ""
            lines.append(f"  {p.name} ({p.kind}){where}")
            for k in p.keys:
                limit = k.max_concurrency or p.max_concurrency
                lines.append(f"    key {k.id}: secret={_mask(k.secret)} max_concurrency={limit}")
        lines += ["", "models (chain in the order tried):"]
        names = [m.name for m in config.models]
        if not names:
            lines.append("  (no [[models]]; use `provider/upstream-id` names)")
        for name in names:
            routes = chain.build(name, [])
            lines.append(f"  {name}:")
            for n, route in enumerate(routes, 1):
                keys = ", ".join(k.id for k in route.provider.keys)
                target = f"{route.provider.name}/{route.upstream}"
                lines.append(f"    {n}. {route.name} -> {target} [keys: {keys}]")
        lines += [
            "",
            f"gateway: {gw.host}:{gw.port} api_keys={len(gw.api_keys)} "
            f"admin_key={_mask(gw.admin_key)} max_body_bytes={gw.max_body_bytes} "
            f"shutdown_grace={gw.shutdown_grace:g}s",
        ]
        for gk in gw.api_keys:
            lines.append(
                f"  api key {gk.id}: secret={_mask(gk.secret)} tenant={gk.tenant or gk.id}"
            )
    except ConfigError as exc:
        print(f"llm-router: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines), file=out)
    return 0
