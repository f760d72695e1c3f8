"""No secret ever shows in a repr, a snapshot or an error the caller receives."""

from __future__ import annotations

import msgspec
import pytest
from scripted import ScriptedProvider, make_config

from router import (
    ApiKey,
    ChainExhaustedError,
    ChatRequest,
    ChatResponse,
    Message,
    ProviderError,
    Router,
    RouterConfig,
)

SECRET = "sk-TOPSECRET-0123456789abcdef"
SECRET2 = "sk-OTHERSECRET-fedcba9876543210"

CONFIG = f"""
[router]
transient_retries = 0

[[providers]]
name = "leaky"
kind = "custom"
keys = [{{ id = "a", secret = "{SECRET}" }}, {{ id = "b", secret = "{SECRET2}" }}]

[[providers]]
name = "sim"
kind = "simulated"
keys = [{{ id = "s", secret = "{SECRET}" }}]

[[models]]
name = "m"
provider = "leaky"
upstream = "up"
"""


def assert_clean(text: str) -> None:
    assert SECRET not in text
    assert SECRET2 not in text
    # No recognisable fragment either.
    assert "TOPSECRET" not in text
    assert "OTHERSECRET" not in text


def request(model: str = "m") -> ChatRequest:
    return ChatRequest(model=model, messages=[Message("user", "hello")])


def test_config_reprs() -> None:
    cfg = make_config(CONFIG)
    # The secret is in the config (the test would be vacuous otherwise) ...
    assert cfg.providers[0].keys[0].secret == SECRET
    # ... but no repr or str shows it.
    for obj in (cfg, cfg.providers[0], cfg.providers[1], *cfg.providers[0].keys):
        assert_clean(repr(obj))
        assert_clean(str(obj))
    assert "'***'" in repr(cfg.providers[0].keys[0])
    assert "id='a'" in repr(cfg.providers[0].keys[0])


def test_config_repr_in_containers() -> None:
    cfg = make_config(CONFIG)
    assert_clean(repr([cfg]))
    assert_clean(repr({"c": cfg.providers}))
    assert_clean(f"{cfg}")
    assert_clean(f"{cfg!r}")


def test_api_key_repr() -> None:
    key = ApiKey("leaky", "a", SECRET)
    assert key.secret == SECRET
    assert_clean(repr(key))
    assert_clean(str(key))
    assert_clean(f"{key}")
    assert "a" in repr(key) and "leaky" in repr(key)


class Leaky(ScriptedProvider):
    """A provider that echoes the key's secret into its errors (a bad adapter)."""

    kind_to_raise: str = "bad_request"
    raw: bool = False

    async def complete(self, request: ChatRequest, key: ApiKey) -> ChatResponse:
        await super().complete(request, key)  # records the call
        if self.raw:
            raise RuntimeError(f"crashed while using {key.secret}")
        raise ProviderError(
            self.kind_to_raise,  # type: ignore[arg-type]
            f"upstream rejected key {key.secret} (id {key.id})",
            status=400,
        )


async def test_propagated_error_is_scrubbed() -> None:
    prov = Leaky()
    async with Router.open(make_config(CONFIG), providers={"leaky": prov}) as r:
        with pytest.raises(ProviderError) as ei:
            await r.submit(request())
        snap = r.snapshot()
        encoded = msgspec.json.encode(snap).decode()
    err = ei.value
    assert prov.calls_to("a") == 1
    assert err.kind == "bad_request"
    assert "***" in err.message
    assert "(id a)" in err.message  # the rest of the message survives
    for text in (str(err), repr(err), err.message, *map(str, err.args)):
        assert_clean(text)
    assert_clean(encoded)
    assert_clean(repr(snap))


async def test_chain_exhausted_error_is_scrubbed() -> None:
    prov = Leaky()
    prov.kind_to_raise = "auth"  # next key, then chain exhausted
    async with Router.open(make_config(CONFIG), providers={"leaky": prov}) as r:
        with pytest.raises(ChainExhaustedError) as ei:
            await r.submit(request())
        encoded = msgspec.json.encode(r.snapshot()).decode()
    err = ei.value
    assert prov.calls_to("a") == 1 and prov.calls_to("b") == 1
    assert err.last_error is not None
    assert "***" in str(err)
    for text in (str(err), repr(err), str(err.last_error), repr(err.last_error)):
        assert_clean(text)
    assert_clean(encoded)


async def test_generic_exception_from_provider_is_scrubbed() -> None:
    prov = Leaky()
    prov.raw = True  # RuntimeError -> unknown failure -> chain exhausted
    async with Router.open(make_config(CONFIG), providers={"leaky": prov}) as r:
        with pytest.raises(ChainExhaustedError) as ei:
            await r.submit(request())
    err = ei.value
    assert err.kind == "unknown"
    assert "RuntimeError" in str(err)
    assert "***" in str(err)
    assert_clean(str(err))
    assert_clean(repr(err.last_error))


async def test_snapshot_and_router_repr() -> None:
    async with Router.open(make_config(CONFIG), providers={"leaky": ScriptedProvider()}) as r:
        resp = await r.submit(request())
        assert resp.content == "ok from a"
        resp2 = await r.submit(request("sim/x"))
        snap = r.snapshot()
        encoded = msgspec.json.encode(snap).decode()
        assert {(k.provider, k.key_id) for k in snap.keys} == {
            ("leaky", "a"),
            ("leaky", "b"),
            ("sim", "s"),
        }
        for text in (encoded, repr(snap), repr(r), str(r), repr(resp), repr(resp2)):
            assert_clean(text)
        for rt in r._runtimes.values():
            for actor in rt.actors:
                assert_clean(repr(actor))
                assert_clean(repr(actor.key))
    assert_clean(repr(r))


def test_config_json_roundtrip_is_not_a_repr() -> None:
    # Sanity check that the secrets are really inside the config: encoding it does
    # show them, so the repr tests above are meaningful.
    cfg = RouterConfig.from_toml(CONFIG)
    assert SECRET in msgspec.json.encode(cfg).decode()
