"""The model chain: from a request to the ordered list of models to try.

``[request.model] + request.fallbacks + the model's configured fallbacks + global
fallbacks``, each trimmed, empties dropped, de-duplicated in first-seen order. A name
is a configured alias or ``provider/upstream-id``. Chains are cached per (model,
fallbacks), so the hot path builds each distinct chain once.

This module resolves names only; health and key choice belong to the supervisor.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Generic, TypeVar

from ._config import RouterConfig
from ._errors import InvalidRequestError, UnknownModelError

__all__ = ["ModelChain", "Route"]

P = TypeVar("P")

_CACHE_LIMIT = 4096
_ROUTES_LIMIT = 4096
"""Resolved `provider/upstream` routes kept (configured models are always kept)."""


class Route(Generic[P]):
    """One chain entry resolved: its name, its provider's runtime and upstream id."""

    __slots__ = (
        "context_window",
        "continuation",
        "drop_params",
        "hedge_after",
        "mode",
        "name",
        "provider",
        "upstream",
    )

    def __init__(
        self,
        name: str,
        provider: P,
        upstream: str,
        context_window: int | None = None,
        drop_params: bool | None = None,
        continuation: bool | None = None,
        hedge_after: float | str | None = None,
        mode: str | None = None,
    ) -> None:
        self.name = name
        self.provider = provider
        self.upstream = upstream
        self.context_window = context_window
        self.drop_params = drop_params
        self.continuation = continuation
        self.hedge_after = hedge_after
        self.mode = mode
        """"chat" or "embedding" for a configured model; None for a `provider/upstream`
        name (it may serve either kind)."""

    def __repr__(self) -> str:
        return f"Route({self.name!r} -> {self.upstream!r})"


class ModelChain(Generic[P]):
    def __init__(self, config: RouterConfig, providers: Mapping[str, P]) -> None:
        self._providers = providers
        self._models = {m.name: m for m in config.models}
        self._global = [f.strip() for f in config.router.fallbacks]
        self._routes: dict[str, Route[P]] = {}
        self._cache: dict[tuple[str, tuple[str, ...]], tuple[Route[P], ...]] = {}

    def resolve(self, name: str, field: str = "model") -> Route[P]:
        route = self._routes.get(name)
        if route is not None:
            return route
        model = self._models.get(name)
        if model is not None:
            route = Route(
                name,
                self._providers[model.provider],
                model.upstream,
                model.context_window,
                model.drop_params,
                model.continuation,
                model.hedge_after,
                model.mode,
            )
        else:
            prov, sep, upstream = name.partition("/")
            provider = self._providers.get(prov) if sep and upstream else None
            if provider is None:
                raise UnknownModelError(name, field)
            route = Route(name, provider, upstream)
            if len(self._routes) >= _ROUTES_LIMIT:
                return route  # a caller's made-up names are not kept beyond the limit
        self._routes[name] = route
        return route

    def names(self, model: str, fallbacks: Sequence[str]) -> list[str]:
        """The de-duplicated chain of names (unresolved)."""
        out: list[str] = []
        seen: set[str] = set()

        def push(raw: str) -> None:
            name = raw.strip()
            if name and name not in seen:
                seen.add(name)
                out.append(name)

        push(model)
        for f in fallbacks:
            push(f)
        first = self._models.get(model.strip())
        if first is not None:
            for f in first.fallbacks:
                push(f)
        for f in self._global:
            push(f)
        return out

    def build(
        self, model: str, fallbacks: Sequence[str], max_chain: int | None = None
    ) -> tuple[Route[P], ...]:
        """The request's chain, resolved. More than `max_chain` models is a clear
        `InvalidRequestError` before anything is resolved or cached."""
        key = (model, tuple(fallbacks))
        chain = self._cache.get(key)
        if chain is not None:
            return chain
        names = self.names(model, fallbacks)
        if not names:
            raise UnknownModelError(model)
        if max_chain is not None and len(names) > max_chain:
            raise InvalidRequestError(
                "fallbacks",
                f"the model chain would hold {len(names)} models; at most max_chain = {max_chain}",
            )
        routes = []
        for name in names:
            try:
                routes.append(self.resolve(name))
            except UnknownModelError:
                field = "model"
                for i, f in enumerate(fallbacks):
                    if name != model.strip() and f.strip() == name:
                        field = f"fallbacks[{i}]"
                        break
                raise UnknownModelError(name, field) from None
        chain = tuple(routes)
        if len(self._cache) < _CACHE_LIMIT:
            self._cache[key] = chain
        return chain
