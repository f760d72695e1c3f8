"""``python -m router.emulator --port N [--host H] [--valid-key K] [--strict-paths]
[--html-404]``: serve until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import signal
import sys

import trio

from router.emulator._server import Emulator


async def _serve(
    host: str, port: int, valid_keys: list[str] | None, strict_paths: bool, html_404: bool
) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with Emulator.serve(
            host=host,
            port=port,
            valid_keys=valid_keys,
            strict_paths=strict_paths,
            html_404=html_404,
        ) as emulator:
            print(emulator.url, flush=True)
            async for _ in signals:
                break


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m router.emulator",
        description="Loopback OpenAI/Anthropic/Gemini emulator with scripted faults.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument(
        "--valid-key",
        action="append",
        dest="valid_keys",
        help="accept only these API keys (repeatable); others get a 401",
    )
    parser.add_argument(
        "--strict-paths",
        action="store_true",
        help="only the providers' own API paths are routes (no base-path prefix)",
    )
    parser.add_argument(
        "--html-404", action="store_true", help="answer unknown paths with an HTML page"
    )
    args = parser.parse_args(argv)
    trio.run(_serve, args.host, args.port, args.valid_keys, args.strict_paths, args.html_404)
    return 0


if __name__ == "__main__":
    sys.exit(main())
