"""Running the gateway: one `Router` per process, opened around Hypercorn's trio worker
in the same trio run, and the `serve` / `check` commands of the CLI.

``serve --workers N`` (N > 1): the parent process binds the listening socket once and
starts N worker processes that inherit it (each serves it with its own Router, so
accepted connections spread over the workers); the parent forwards SIGTERM/SIGINT to
them, restarts a worker that dies, and exits when all have stopped. A worker whose
parent disappears drains and stops by itself. Workers share breaker, cooldown, health
and budget state only through `[router.shared]` (Redis); without it each has its own.

Shutdown (SIGTERM or SIGINT, or `shutdown_trigger` returning): Hypercorn stops
accepting, idle keep-alive connections close, in-flight requests get
`gateway.shutdown_grace` seconds to finish; then the router closes and `serve` returns.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
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
    fd: int | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the gateway until `shutdown_trigger` returns (forever when None).

    `task_status.started` gets the bound URLs (``http://127.0.0.1:PORT``), so
    ``await nursery.start(partial(serve, config, port=0))`` tells the free port chosen.
    `fd`: serve an inherited listening socket instead of binding (a `--workers` worker).
    """
    gw = config.gateway
    app = GatewayApp(config)  # resolves the gateway secrets first: a bad one fails fast
    hc = HypercornConfig()
    bind_host = host if host is not None else gw.host
    bind_port = port if port is not None else gw.port
    if fd is not None:
        hc.bind = [f"fd://{fd}"]
    else:
        hc.bind = [_bind_address(bind_host, bind_port)]
    hc.graceful_timeout = gw.shutdown_grace
    hc.accesslog = None
    hc.errorlog = logging.getLogger("router.gateway.hypercorn")
    hc.keep_alive_timeout = 30.0
    # Hypercorn's default listen backlog (100) drops connection bursts (1,024 clients
    # at once measured 15 errors and a 56 s p99); the kernel caps it at somaxconn.
    hc.backlog = gw.backlog
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


def _bind_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


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
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes serving one port (share state with [router.shared])",
    )
    parser.add_argument("--worker-fd", type=int, default=None, help=argparse.SUPPRESS)


def add_check_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="router config (TOML or JSON)")


async def _serve_until_signal(
    config: RouterConfig, host: str | None, port: int | None, fd: int | None = None
) -> None:
    parent = os.getppid()
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def on_signal() -> None:
            async with trio.open_nursery() as watch:
                if fd is not None:
                    watch.start_soon(_until_orphaned, parent, watch.cancel_scope)
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    break
                watch.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(serve, config, host=host, port=port, shutdown_trigger=on_signal, fd=fd)
            )
            if fd is None:
                for url in binds:
                    print(f"llm-router gateway listening on {url}", flush=True)
            else:
                log.info("worker %d serving", os.getpid())
    log.info("gateway stopped")


async def _until_orphaned(parent: int, scope: trio.CancelScope) -> None:
    """A worker: return (draining it) once the supervising parent is gone."""
    while True:
        if os.getppid() != parent:
            break
        await trio.sleep(0.5)
    log.warning("worker %d: supervisor gone: draining", os.getpid())
    scope.cancel()


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock


async def _supervise(args: argparse.Namespace, config: RouterConfig, workers: int) -> None:
    """The parent of `serve --workers N`: bind once, run N workers on the socket."""
    gw = config.gateway
    host = args.host if args.host is not None else gw.host
    port = args.port if args.port is not None else gw.port
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    print(f"llm-router gateway ({workers} workers) listening on http://{shown}:{bound}", flush=True)
    command = [
        sys.executable,
        "-m",
        "router",
        "serve",
        "--config",
        str(args.config),
        "--log-level",
        args.log_level,
        "--worker-fd",
        str(sock.fileno()),
    ]
    stopping = False
    procs: dict[int, trio.Process] = {}

    async def worker(n: int) -> None:
        while not stopping:
            proc = await trio.lowlevel.open_process(command, pass_fds=(sock.fileno(),))
            procs[n] = proc
            code = await proc.wait()
            if stopping:
                return
            log.warning("worker %d (pid %d) exited with %s: restarting", n, proc.pid, code)
            await trio.sleep(1.0)

    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                for n in range(workers):
                    nursery.start_soon(worker, n)
                async for signum in signals:
                    log.info("received %s: stopping the workers", signal.Signals(signum).name)
                    stopping = True
                    for proc in procs.values():
                        if proc.returncode is None:
                            proc.send_signal(signal.SIGTERM)
                    break
    finally:
        sock.close()
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
        if args.workers < 1:
            raise ConfigError("--workers", "must be at least 1")
        if args.workers > 1 and args.worker_fd is None:
            GatewayApp(config)  # a bad gateway secret fails here, not in every worker
            trio.run(_supervise, args, config, args.workers)
        else:
            trio.run(_serve_until_signal, config, args.host, args.port, args.worker_fd)
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
