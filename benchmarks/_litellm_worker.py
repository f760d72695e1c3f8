"""LiteLLM's `Router.acompletion` under a closed-loop load, on asyncio, in LiteLLM's own
virtual environment (benchmarks/.venv-litellm, made by throughput.py). Standard
library and litellm only: this process cannot import trio or the router.

    benchmarks/.venv-litellm/bin/python benchmarks/_litellm_worker.py \
        --api-base http://127.0.0.1:PORT/v1 --concurrency 64 --requests 2000

Prints one JSON object: latencies (s), elapsed (s), this process's CPU seconds during
the measured run (time.process_time), errors. The upstream is the same nginx as every
other row; model ``openai/gpt-4o-mini`` with a dummy key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no cost-map download
os.environ.setdefault("LITELLM_LOG", "ERROR")


async def run(args: argparse.Namespace) -> dict[str, object]:
    import litellm
    from litellm import Router

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    logging.getLogger("LiteLLM Router").setLevel(logging.ERROR)
    router = Router(
        model_list=[
            {
                "model_name": "m",
                "litellm_params": {
                    "model": "openai/gpt-4o-mini",
                    "api_base": args.api_base,
                    "api_key": "sk-bench",
                },
            }
        ],
        num_retries=0,
    )
    messages = [{"role": "user", "content": "Say hello."}]
    latencies: list[float] = []
    errors = 0
    first_error = ""

    async def phase(total: int, deadline: float) -> float:
        nonlocal errors, first_error
        left = total

        async def caller() -> None:
            nonlocal left, errors, first_error
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                t0 = time.perf_counter()
                try:
                    await router.acompletion(model="m", messages=messages)
                except Exception as exc:
                    errors += 1
                    first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                else:
                    latencies.append(time.perf_counter() - t0)

        start = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(args.concurrency)))
        return time.perf_counter() - start

    await phase(args.warmup, time.perf_counter() + 120)
    latencies.clear()
    errors = 0
    cpu0 = time.process_time()
    elapsed = await phase(args.requests, time.perf_counter() + args.max_seconds)
    cpu = time.process_time() - cpu0
    return {
        "latencies": latencies,
        "elapsed": elapsed,
        "cpu": cpu,
        "errors": errors,
        "first_error": first_error,
        "litellm": _version(),
    }


def _version() -> str:
    from importlib.metadata import version

    return version("litellm")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--api-base", required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
