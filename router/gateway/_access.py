"""The gateway's access log: one line per request on the ``router.access`` logger.

`Access` collects what one request did while it is served (the app fills it through
`current`); `line` renders it once at the end, as JSON (msgspec) or as one readable
line. Nothing in it is message content or a secret: the tenant is the gateway key's
tenant name, keys are named by their ids.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

import msgspec

if TYPE_CHECKING:
    from .._stream import Segment
    from .._types import Attempt, EmbeddingUsage, Usage

__all__ = ["Access", "access_log", "current", "line", "request_id"]

access_log: Final = logging.getLogger("router.access")

_VALID_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_encode = msgspec.json.Encoder().encode

current: contextvars.ContextVar[Access | None] = contextvars.ContextVar(
    "router_access", default=None
)
"""The access entry of the request being served (None outside a logged endpoint)."""


def request_id(given: str | None) -> str:
    """The client's ``x-request-id`` when it is a plain id, else a new one."""
    if given is not None and _VALID_ID.fullmatch(given):
        return given
    return uuid.uuid4().hex


class Access:
    """What one request did, filled in while it is served."""

    __slots__ = (
        "attempts",
        "cost",
        "dropped",
        "error",
        "key_id",
        "method",
        "model",
        "model_asked",
        "overhead",
        "path",
        "provider",
        "request_id",
        "segments",
        "stream",
        "tenant",
        "time",
        "trace_id",
        "usage",
    )

    def __init__(self, rid: str, method: str, path: str, at: float) -> None:
        self.request_id = rid
        self.method = method
        self.path = path
        self.time = at
        self.tenant: str | None = None
        self.model_asked: str | None = None
        self.model: str | None = None
        self.provider: str | None = None
        self.key_id: str | None = None
        self.stream = False
        self.attempts: list[Attempt] = []
        self.segments: list[Segment] | None = None
        self.overhead: float | None = None
        self.usage: Usage | EmbeddingUsage | None = None
        self.error: str | None = None
        self.dropped = ""
        self.cost: float | None = None
        """The answer's cost in USD (None: no price, or no answer)."""
        self.trace_id: str | None = None
        """The request's OpenTelemetry trace id (hex), when it was traced."""

    def fields(self, status: int, latency: float) -> dict[str, Any]:
        usage = self.usage
        entry: dict[str, Any] = {
            "request_id": self.request_id,
            "time": datetime.fromtimestamp(self.time, UTC).isoformat(timespec="milliseconds"),
            "method": self.method,
            "path": self.path,
            "status": status,
            "tenant": self.tenant,
            "model_asked": self.model_asked,
            "model": self.model or None,
            "provider": self.provider or None,
            "key_id": self.key_id or None,
            "stream": self.stream,
            "attempts": [
                {
                    "model": a.model,
                    "key_id": a.key_id,
                    "outcome": a.outcome,
                    "duration_ms": round(a.duration * 1000.0, 3),
                }
                for a in self.attempts
            ],
            "latency_ms": round(latency * 1000.0, 3),
            "overhead_ms": round(self.overhead * 1000.0, 3) if self.overhead is not None else None,
            "input_tokens": usage.prompt_tokens if usage is not None else None,
            "output_tokens": getattr(usage, "completion_tokens", 0) if usage is not None else None,
        }
        cached = getattr(usage, "cached_tokens", 0)
        if cached:
            entry["cached_tokens"] = cached
        if self.cost is not None:
            entry["cost_usd"] = self.cost
        if self.segments is not None and len(self.segments) > 1:
            entry["segments"] = [
                {
                    "model": s.model,
                    "provider": s.provider,
                    "key_id": s.key_id,
                    "mode": s.mode,
                    "chars": s.chars,
                }
                for s in self.segments
            ]
        if self.error is not None:
            entry["error"] = self.error
        if self.dropped:
            entry["dropped_params"] = self.dropped.split(",")
        if self.trace_id is not None:
            entry["trace_id"] = self.trace_id
        return entry


def line(access: Access, status: int, latency: float, fmt: str) -> str:
    """The log line: JSON, or (`fmt` "text") the main fields on one readable line."""
    f = access.fields(status, latency)
    if fmt == "json":
        return _encode(f).decode()
    served = f["model"] or "-"
    parts = [
        f["time"],
        f["request_id"],
        f"{f['method']} {f['path']} {status}",
        f"tenant={f['tenant'] or '-'}",
        f"model={f['model_asked'] or '-'}->{served}",
        f"provider={f['provider'] or '-'}",
        f"key={f['key_id'] or '-'}",
        f"attempts={len(f['attempts'])}",
        f"stream={'yes' if f['stream'] else 'no'}",
        f"latency_ms={f['latency_ms']}",
        f"overhead_ms={f['overhead_ms'] if f['overhead_ms'] is not None else '-'}",
        f"tokens={f['input_tokens'] if f['input_tokens'] is not None else '-'}"
        f"/{f['output_tokens'] if f['output_tokens'] is not None else '-'}",
    ]
    if "cost_usd" in f:
        parts.append(f"cost_usd={f['cost_usd']:.10f}".rstrip("0").rstrip("."))
    if "segments" in f:
        parts.append(f"segments={len(f['segments'])}")
    if "error" in f:
        parts.append(f"error={f['error']}")
    return " ".join(parts)
