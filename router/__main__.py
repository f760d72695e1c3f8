"""The `llm-router` command line (also `python -m router`).

Subcommands:

- ``demo``: a burst of requests through simulated providers, showing retries, failover,
  cooldowns and breakers live (see `router._demo`).
- ``serve``: the OpenAI-compatible HTTP gateway (see `router.gateway`).
- ``check``: validate a config and print each model's resolved chain, secrets masked.
- ``import-litellm``: translate a LiteLLM proxy ``config.yaml`` into our TOML (see
  `router._litellm`).
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
    imp = commands.add_parser(
        "import-litellm",
        help="translate a LiteLLM proxy config.yaml into an llm-router TOML config",
        description="Print (or write) the TOML equivalent of a LiteLLM config, with a "
        "comment on every setting that does not carry over.",
    )
    imp.add_argument("config", help="the LiteLLM config.yaml")
    imp.add_argument("-o", "--output", help="write the TOML here instead of stdout")
    from .gateway import _serve

    _serve.add_serve_arguments(serve)
    _serve.add_check_arguments(check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: ``sys.argv[1:]``), run the subcommand, return its exit status."""
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo.run_command(args)
    if args.command == "import-litellm":
        return _import_litellm(args.config, args.output)
    if args.command in ("serve", "check"):
        from .gateway import _serve

        return _serve.serve_command(args) if args.command == "serve" else _serve.check_command(args)
    raise AssertionError(f"unhandled command {args.command!r}")  # argparse rejects others


def _import_litellm(path: str, output: str | None) -> int:
    from ._errors import ConfigError
    from ._litellm import import_litellm

    try:
        with open(path, "rb") as f:
            result = import_litellm(f.read(), source=path)
    except OSError as exc:
        print(f"llm-router import-litellm: cannot read {path!r}: {exc.strerror}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"llm-router import-litellm: {path}: {exc}", file=sys.stderr)
        return 2
    for warning in result.warnings:
        print(f"llm-router import-litellm: warning: {warning}", file=sys.stderr)
    if output is None:
        sys.stdout.write(result.toml)
        return 0
    try:
        with open(output, "w", encoding="utf-8") as f:
            f.write(result.toml)
    except OSError as exc:
        print(
            f"llm-router import-litellm: cannot write {output!r}: {exc.strerror}", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
