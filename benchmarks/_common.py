"""Shared benchmark plumbing: the loopback nginx upstream, subprocess hygiene, the
trio load generators (closed loop, sharded), the HTTP load-generator worker, CPU
accounting, statistics, and the JSON / Markdown / PNG writers.

Run as a script, this module is the load generator for the HTTP rows, in a process of
its own so that it never shares an event loop with the server it measures:

    python benchmarks/_common.py loadgen --url http://127.0.0.1:PORT/v1/chat/completions \
        --concurrency 64 --requests 2000 [--stream]

It prints one JSON object (latencies, elapsed, its own CPU time, error count, the
``x-router-overhead-ms`` values it saw) on stdout.

Everything here talks to loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import trio

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
ROOT = BENCH.parent
VENV_PY = ROOT / ".venv" / "bin" / "python"
LOOPBACK = "127.0.0.1"

# The fixed OpenAI chat.completion nginx returns (and every row parses).
COMPLETION = {
    "id": "chatcmpl-bench",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o-mini",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello! How can I help you today?"},
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 9, "completion_tokens": 9, "total_tokens": 18},
}
PROMPT = [{"role": "user", "content": "Say hello."}]
STREAM_CHUNKS = 100  # content chunks in the fixed stream nginx serves


def sse_body(chunks: int = STREAM_CHUNKS) -> str:
    """A fixed OpenAI chat-completion stream: a role chunk, `chunks` content chunks, a
    finish chunk and ``[DONE]``."""

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-mini",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        return "data: " + json.dumps(chunk, separators=(",", ":")) + "\n\n"

    parts = [event({"role": "assistant", "content": ""})]
    parts += [event({"content": f"w{i} "}) for i in range(chunks)]
    parts += [event({}, "stop"), "data: [DONE]\n\n"]
    return "".join(parts)


UPSTREAM_MODEL = "gpt-4o-mini"


# ----------------------------------------------------------------------------- machine


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_gb = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        first = Path("/proc/meminfo").read_text().splitlines()[0]
        mem_gb = int(first.split()[1]) / 1024 / 1024
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "memory_gb": round(mem_gb, 1),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "trio": trio.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": _git_commit(),
    }


def _git_commit() -> str:
    """HEAD of the project, plus which router/ files were modified in the working tree."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "router"], cwd=ROOT, capture_output=True, text=True
        ).stdout.split()[1::2]
    except OSError:
        return "unknown"
    return head + (f" + uncommitted {', '.join(dirty)}" if dirty else "")


def machine_line(meta: dict[str, Any]) -> str:
    return (
        f"{meta['cpus']} cores ({meta['cpu']}, shared, noisy), {meta['memory_gb']} GB, "
        f"{meta['os']}, Python {meta['python']}, trio {meta['trio']}, {meta['date']}, "
        f"router at {meta.get('commit', '?')}"
    )


# ----------------------------------------------------------------------------- processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any] | None = None, timeout: float = 60.0) -> None:
    """Block until something accepts on loopback:port (or the process dies)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on {LOOPBACK}:{port} after {timeout:.0f} s")


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it after `grace` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def spawned(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    log: Path | None = None,
    grace: float = 10.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """A subprocess in its own process group, stopped (group-wide) when the block exits,
    errors included. Its output goes to `log` (or nowhere)."""
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [str(a) for a in argv],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        stop_process(proc, grace)
        if log:
            out.close()  # type: ignore[union-attr]


def run_json(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Run a worker process to completion and parse the JSON object it prints last."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            start_new_session=True,
        )
        try:
            out, _ = proc.communicate(timeout=timeout)
        except BaseException:
            stop_process(proc, 2.0)
            raise
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"worker {argv[1:3]} exited {proc.returncode}: {tail}")
    lines = [ln for ln in out.decode().splitlines() if ln.startswith("{")]
    return dict(json.loads(lines[-1]))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its live descendants (/proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = Path(f"/proc/{entry}/stat").read_text()
            fields = raw[raw.rindex(")") + 2 :].split()
            parents[int(entry)] = int(fields[1])
            cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo.extend(c for c, parent in parents.items() if parent == p)
    return total


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# ----------------------------------------------------------------------------- nginx

_NGINX_CONF = """
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{port} backlog=4096;
        location = /v1/chat/completions {{
            default_type application/json;
            return 200 '{body}';
        }}
        location = /stream/v1/chat/completions {{
            # a static file answers only GET: an internal redirect turns the POST into one
            error_page 418 =200 /stream.sse;
            return 418;
        }}
        location = /stream.sse {{
            internal;
            root {tmp};
            default_type text/event-stream;
        }}
        location / {{ return 404; }}
    }}
}}
"""


@contextlib.contextmanager
def nginx_upstream() -> Iterator[str]:
    """nginx on loopback answering POST /v1/chat/completions with `COMPLETION`; yields
    its base URL (``http://127.0.0.1:PORT/v1``) and stops it when the block exits. The
    same path under ``/stream/v1`` answers the fixed stream of `sse_body`."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(binary).exists():
        raise SystemExit(
            "nginx is needed for the throughput upstream: apt-get update && "
            "apt-get install -y nginx"
        )
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-nginx-") as tmp:
        body = json.dumps(COMPLETION, separators=(",", ":"))
        conf = Path(tmp) / "nginx.conf"
        (Path(tmp) / "stream.sse").write_text(sse_body())
        os.chmod(tmp, 0o755)  # nginx workers run as an unprivileged user when we are root
        conf.write_text(_NGINX_CONF.format(tmp=tmp, host=LOOPBACK, port=port, body=body))
        with spawned([binary, "-p", tmp, "-c", str(conf)], log=Path(tmp) / "stdout.log") as p:
            wait_port(port, p, 10)
            yield f"http://{LOOPBACK}:{port}/v1"


# ----------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    i = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[i]


def summarize(
    latencies: Sequence[float], elapsed: float, cpu_seconds: float, errors: int = 0
) -> dict[str, Any]:
    """req/s, p50/p99 latency (ms) and CPU µs per request of one run."""
    lat = sorted(latencies)
    done = len(lat)
    return {
        "requests": done,
        "errors": errors,
        "seconds": round(elapsed, 3),
        "rps": done / elapsed if elapsed > 0 else 0.0,
        "p50_ms": percentile(lat, 50) * 1e3,
        "p99_ms": percentile(lat, 99) * 1e3,
        "cpu_us": cpu_seconds / done * 1e6 if done else math.nan,
    }


# ----------------------------------------------------------------------------- load


async def closed_loop(
    call: Callable[[int], Awaitable[object]],
    concurrency: int,
    total: int,
    max_seconds: float = math.inf,
) -> tuple[list[float], float, int]:
    """`concurrency` callers share `total` requests; caller i passes its index to
    `call`. Stops handing out requests after `max_seconds`. Returns the latencies of
    the successful ones, the elapsed wall time and the number of failures."""
    latencies: list[float] = []
    errors = 0
    left = total
    clock = time.perf_counter
    stop_at = clock() + max_seconds

    async def caller(i: int) -> None:
        nonlocal left, errors
        while left > 0 and clock() < stop_at:
            left -= 1
            t0 = clock()
            try:
                await call(i)
            except Exception:
                errors += 1
            else:
                latencies.append(clock() - t0)

    start = clock()
    async with trio.open_nursery() as nursery:
        for i in range(concurrency):
            nursery.start_soon(caller, i)
    return latencies, clock() - start, errors


def shard_count(concurrency: int, shard_size: int) -> int:
    return max(1, math.ceil(concurrency / shard_size))


class RawHttpConnection:
    """A minimal keep-alive HTTP/1.1 client connection for the load generator: it sends
    pre-encoded requests and reads Content-Length or chunked answers. Much cheaper than a
    general client, so that the load generator is not what limits an HTTP row."""

    _LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.I)
    _CHUNKED = re.compile(rb"\r\ntransfer-encoding:\s*chunked", re.I)
    _OVERHEAD = re.compile(rb"\r\nx-router-overhead-ms:\s*([0-9.]+)", re.I)

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.stream: trio.SocketStream | None = None
        self.buf = bytearray()

    async def _fill(self) -> None:
        assert self.stream is not None
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionError("connection closed by the server")
        self.buf += data

    async def request(self, payload: bytes) -> tuple[int, bytes, bytes]:
        """Send one request; return (status, head, body)."""
        if self.stream is None:
            self.stream = await trio.open_tcp_stream(self.host, self.port)
            self.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            await self.stream.send_all(payload)
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                await self._fill()
            head = bytes(self.buf[: end + 2])
            del self.buf[: end + 4]
            if m := self._LENGTH.search(head):
                n = int(m.group(1))
                while len(self.buf) < n:
                    await self._fill()
                body = bytes(self.buf[:n])
                del self.buf[:n]
            elif self._CHUNKED.search(head):
                body = await self._chunked()
            else:
                raise ConnectionError("response without length")
        except BaseException:
            await self.aclose()
            raise
        return int(head[9:12]), head, body

    async def _chunked(self) -> bytes:
        parts = []
        while True:
            while (eol := self.buf.find(b"\r\n")) < 0:
                await self._fill()
            size = int(bytes(self.buf[:eol]).split(b";")[0], 16)
            del self.buf[: eol + 2]
            while len(self.buf) < size + 2:
                await self._fill()
            parts.append(bytes(self.buf[:size]))
            del self.buf[: size + 2]
            if size == 0:
                return b"".join(parts)

    async def aclose(self) -> None:
        stream, self.stream = self.stream, None
        self.buf.clear()
        if stream is not None:
            await stream.aclose()


def encode_post(host: str, port: int, path: str, body: dict[str, Any], token: str) -> bytes:
    raw = json.dumps(body).encode()
    return (
        f"POST {path} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
        f"authorization: Bearer {token}\r\ncontent-length: {len(raw)}\r\n\r\n"
    ).encode() + raw


async def http_load(
    url: str,
    body: dict[str, Any],
    concurrency: int,
    total: int,
    max_seconds: float,
    warmup: int,
    token: str = "bench",
    server_pid: int = 0,
) -> dict[str, Any]:
    """Closed-loop POSTs to `url` over one keep-alive connection per caller, after a
    warm-up on the same connections. Returns the raw latencies, what the load generator
    itself cost, and the CPU seconds of `server_pid`'s process tree over the measured
    run."""
    m = re.match(r"http://([^/:]+):(\d+)(/.*)", url)
    assert m, url
    host, port, path = m.group(1), int(m.group(2)), m.group(3)
    payload = encode_post(host, port, path, body, token)
    conns = [RawHttpConnection(host, port) for _ in range(concurrency)]
    overheads: list[float] = []
    chunks = 0
    statuses: dict[int, int] = {}

    async def call(i: int) -> None:
        nonlocal chunks
        status, head, resp = await conns[i].request(payload)
        if status != 200:
            statuses[status] = statuses.get(status, 0) + 1
            raise RuntimeError(f"HTTP {status}")
        if om := RawHttpConnection._OVERHEAD.search(head):
            overheads.append(float(om.group(1)))
        if body.get("stream"):
            chunks += max(0, resp.count(b"data: ") - 1)

    if warmup:
        await closed_loop(call, concurrency, warmup)
    overheads.clear()
    chunks = 0
    server0 = tree_cpu_seconds(server_pid) if server_pid else 0.0
    cpu0 = time.process_time()
    latencies, elapsed, errors = await closed_loop(call, concurrency, total, max_seconds)
    cpu = time.process_time() - cpu0
    server_cpu = tree_cpu_seconds(server_pid) - server0 if server_pid else 0.0
    for c in conns:
        await c.aclose()
    return {
        "latencies": latencies,
        "elapsed": elapsed,
        "errors": errors,
        "statuses": statuses,
        "loadgen_cpu": cpu,
        "server_cpu": server_cpu,
        "overhead_ms": overheads,
        "chunks": chunks,
    }


def run_loadgen(
    url: str,
    concurrency: int,
    total: int,
    *,
    model: str,
    stream: bool = False,
    max_seconds: float = 30.0,
    warmup: int = 0,
    token: str = "bench",
    server_pid: int = 0,
) -> dict[str, Any]:
    """Run the HTTP load generator in its own process; return its JSON report. The
    bearer token travels in the environment, never on a command line."""
    argv: list[str | os.PathLike[str]] = [
        sys.executable, __file__, "loadgen", "--url", url, "--model", model,
        "--concurrency", str(concurrency), "--requests", str(total),
        "--max-seconds", str(max_seconds), "--warmup", str(warmup),
        "--server-pid", str(server_pid),
    ]  # fmt: skip
    if stream:
        argv.append("--stream")
    env = {**os.environ, "BENCH_TOKEN": token}
    return run_json(argv, env=env, timeout=max_seconds + 300)


# ----------------------------------------------------------------------------- output


def fmt(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "–"
    return f"{a / b:.2f}x"


def write_results(name: str, payload: dict[str, Any], markdown: str) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown.rstrip() + "\n")


def plot_series(
    name: str,
    title: str,
    series: dict[str, list[tuple[float, float, float]]],
    xlabel: str = "concurrent requests",
    ylabels: tuple[str, str] = ("requests / s", "p99 latency (ms)"),
) -> Path | None:
    """Two panels against concurrency (log x): throughput and p99, one line per row.
    `series` maps a row label to (x, throughput, p99) points."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no chart", file=sys.stderr)
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    markers = "osD^vP*X"
    for n, (label, points) in enumerate(series.items()):
        pts = [p for p in points if p[1] and not math.isnan(p[1])]
        if not pts:
            continue
        xs = [p[0] for p in pts]
        kw = {"marker": markers[n % len(markers)], "label": label, "linewidth": 1.8}
        left.plot(xs, [p[1] for p in pts], **kw)
        right.plot(xs, [p[2] for p in pts], **kw)
    for ax, ylabel in ((left, ylabels[0]), (right, ylabels[1])):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    right.set_yscale("log")
    left.set_ylim(bottom=0)
    left.legend(fontsize=9, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    path = RESULTS / f"{name}.png"
    RESULTS.mkdir(exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    marks = {"l": "---", "r": "---:", "c": ":---:"}
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(marks[a] for a in align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def _main() -> None:
    parser = argparse.ArgumentParser(description="benchmark load generator (HTTP rows)")
    sub = parser.add_subparsers(dest="command", required=True)
    lg = sub.add_parser("loadgen")
    lg.add_argument("--url", required=True)
    lg.add_argument("--model", required=True)
    lg.add_argument("--concurrency", type=int, required=True)
    lg.add_argument("--requests", type=int, required=True)
    lg.add_argument("--max-seconds", type=float, default=30.0)
    lg.add_argument("--warmup", type=int, default=0)
    lg.add_argument("--stream", action="store_true")
    lg.add_argument("--server-pid", type=int, default=0, help="measure this process tree")
    args = parser.parse_args()
    body: dict[str, Any] = {"model": args.model, "messages": PROMPT}
    if args.stream:
        body["stream"] = True
    report = trio.run(
        http_load,
        args.url,
        body,
        args.concurrency,
        args.requests,
        args.max_seconds,
        args.warmup,
        os.environ.get("BENCH_TOKEN", "bench"),
        args.server_pid,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    _main()


def router_config(
    base: str, keys: int, per_key: int, port: int = 0, provider: str = "nginx"
) -> str:
    """A router (and gateway) config for the benchmarks: `keys` keys of `per_key`
    concurrency on one `openai` provider at `base`, balanced round robin."""
    key_list = ", ".join(f'{{ id = "k{i}", secret = "sk-bench-{i}" }}' for i in range(keys))
    return f"""
[router]
balancing = "round_robin"
timeout = 120.0
attempt_timeout = 60.0
[[providers]]
name = "{provider}"
kind = "openai"
base_url = "{base}"
max_concurrency = {per_key}
keys = [{key_list}]
[[models]]
name = "m"
provider = "{provider}"
upstream = "{UPSTREAM_MODEL}"
[gateway]
host = "127.0.0.1"
port = {port}
shutdown_grace = 5.0
"""
