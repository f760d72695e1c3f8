"""The OpenAI-compatible HTTP gateway on the router (`llm-router serve`).

    import trio
    from router import RouterConfig
    from router.gateway import serve

    trio.run(serve, RouterConfig.load("router.toml"))

Layout:

- `_app.py`     `GatewayApp`, the ASGI app (chat completions, models, health, admin, metrics)
- `_shapes.py`  OpenAI request/response shapes and the error -> HTTP status mapping
- `_metrics.py` Prometheus metrics on a per-app registry
- `_serve.py`   `serve()` (Router.open around Hypercorn's trio worker) and the CLI commands
"""

from ._app import GatewayApp
from ._serve import serve

__all__ = ["GatewayApp", "serve"]
