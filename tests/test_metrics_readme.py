"""README's metrics table lists exactly the metric families `/metrics` exposes (names
and types), so a dashboard built from it finds every series."""

from __future__ import annotations

import re
from pathlib import Path

from router import ChatRequest, Message, Router, RouterConfig
from router.gateway._metrics import GatewayMetrics
from router.gateway._quota import TenantQuotas

README = Path(__file__).resolve().parent.parent / "README.md"

CONFIG = """
[[providers]]
name = "sim"
kind = "simulated"
keys = [{ id = "k1", secret = "sk-1" }]
[providers.simulate]
latency = 0.0
[[models]]
name = "m"
provider = "sim"
upstream = "sim-1"
price = { input = 1.0, output = 2.0 }
[[gateway.api_keys]]
id = "team"
secret = "gw-secret"
rpm = 10
"""


def _readme_metrics() -> dict[str, str]:
    text = README.read_text()
    section = text[text.index("### Metrics") :]
    section = section[: section.index("\n### ", 5)]
    found: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 4 or not cells[0].startswith("`llm_router_"):
            continue
        for name in re.findall(r"`(llm_router_[a-z_]+)`", cells[0]):
            found[name] = cells[1]
    return found


async def test_readme_lists_every_metric() -> None:
    config = RouterConfig.from_toml(CONFIG)
    async with Router.open(config) as router:
        await router.submit(ChatRequest(model="m", messages=[Message("user", "hi")]))
        metrics = GatewayMetrics(
            router.snapshot, router.usage, TenantQuotas(config.gateway.api_keys)
        )
        metrics.quota_rejected.labels("team", "rpm").inc()
        rendered = metrics.render().decode()
    exposed: dict[str, str] = {}
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", rendered, re.M):
        if name.endswith("_created"):  # prometheus_client's creation-time companions
            continue
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        exposed[name] = kind
    documented = _readme_metrics()
    assert documented, "README has no metrics table"
    assert sorted(set(exposed) - set(documented)) == [], "exposed but not in README"
    assert sorted(set(documented) - set(exposed)) == [], "in README but not exposed"
    assert {n: documented[n] for n in exposed} == exposed
