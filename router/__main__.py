"""The `llm-router` command line (also `python -m router`).

Subcommands:

- ``demo``: a burst of requests through simulated providers, showing retries, failover,
  cooldowns and breakers live (see `router._demo`).
- ``serve``: the OpenAI-compatible HTTP gateway (see `router.gateway`).
- ``check``: validate a config and print each model's resolved chain, secrets masked.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import _demo

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llm-router",
        description="An actor-based LLM request router on trio.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a burst of requests through simulated providers (no API keys needed)",
        description="Send a burst of requests through simulated providers and show failover.",
    )
    _demo.add_arguments(demo)
    serve = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP gateway",
        description="Serve /v1/chat/completions and friends over the router (Hypercorn, trio).",
    )
    check = commands.add_parser(
        "check",
        help="validate a config and print each model's chain",
        description="Validate a config; print providers, keys (secrets masked) and model chains.",
    )
    from .gateway import _serve

    _serve.add_serve_arguments(serve)
    _serve.add_check_arguments(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo.run_command(args)
    if args.command in ("serve", "check"):
        from .gateway import _serve

        return _serve.serve_command(args) if args.command == "serve" else _serve.check_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
