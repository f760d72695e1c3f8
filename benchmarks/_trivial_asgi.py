"""The floor under the gateway row of `throughput.py`: Hypercorn's trio worker serving
an ASGI app that answers every request with the same fixed chat.completion, reading the
body and calling nothing. What is left of the gateway's CPU above this row is the
router's and the gateway's own work (and the upstream call)."""

from __future__ import annotations

import json
from typing import Any

import _common as c

_BODY = json.dumps(c.COMPLETION, separators=(",", ":")).encode()
_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(_BODY))]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rsplit(".", 1)[-1]  # startup or shutdown
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": _HEADERS})
    await send({"type": "http.response.body", "body": _BODY})
