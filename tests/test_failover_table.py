"""The failure table (router/_failover.py) against README.md's table and its time-budget
rules: the docs, the code and these tests read the same table.

The README table is parsed, so a row changed in one place and not the other fails here.
`expected()` below is an independent reading of the README's rules; hypothesis drives
`decide()` over every kind and every combination of the facts it depends on.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from router import ERROR_KINDS
from router._failover import (
    CONTEXT_FALLBACK,
    NEXT_KEY,
    NEXT_MODEL,
    PROPAGATE,
    RETRY,
    RETRY_WITHOUT_MAX_TOKENS,
    WAIT_RETRY,
    Situation,
    Step,
    decide,
    grain,
)

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_table() -> dict[str, dict[str, str]]:
    """kind -> {"marked", "in_place", "then"} from README's "What each failure does"."""
    text = README.read_text()
    section = text[text.index("## What each failure does") : text.index("### Errors")]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        kinds, _signal, marked, in_place, then = cells
        for kind in re.findall(r"`([a-z_]+)`", kinds):
            rows[kind] = {"marked": marked, "in_place": in_place, "then": then}
    return rows


TABLE = readme_table()


def test_the_readme_table_has_one_row_per_error_kind() -> None:
    assert set(TABLE) == set(ERROR_KINDS)


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
@pytest.mark.parametrize("key_wide", [False, True])
def test_grain_matches_the_marked_column(kind: str, key_wide: bool) -> None:
    marked = TABLE[kind]["marked"]
    where = grain(kind, key_wide)  # type: ignore[arg-type]
    if marked == "nothing":
        assert where is None
    elif marked.startswith("model"):
        assert where == "model"
    elif marked.startswith("key"):
        assert where == "key"
    elif kind == "transient":
        assert where == ("key" if key_wide else "lane")
    else:
        assert marked.startswith("lane") and where == "lane"


def then_step(kind: str, key_wide: bool) -> Step:
    """The README's "then" column as a step."""
    then = TABLE[kind]["then"]
    if key_wide and "next key when key-wide" in then:  # (transient only)
        return NEXT_KEY
    if then.startswith("next key"):
        return NEXT_KEY
    if then.startswith("next model"):
        return NEXT_MODEL
    if "context_window_fallbacks" in then:
        return CONTEXT_FALLBACK
    assert then.startswith("raised"), then
    return PROPAGATE


def expected(s: Situation, sibling: bool, later: bool) -> Step:
    """README's rules, read independently of router/_failover.py."""
    in_place = TABLE[s.kind]["in_place"]
    if s.attempts_left <= 0:  # max_attempts reached: nothing more in place
        return then_step(s.kind, s.key_wide and s.kind == "transient")
    if in_place.startswith("retried"):
        # Alternatives that count: other keys only for a key-wide failure.
        alternative = (sibling and s.key_wide and s.kind == "transient") or later
        fits = s.backoff + 2 * s.attempt_timeout <= s.time_left
        if (
            not s.probe
            and s.retries < s.transient_retries
            and s.backoff < s.time_left
            and (not alternative or (not s.timed_out and fits))
        ):
            return Step(RETRY, s.backoff)
    elif in_place.startswith("waited out once"):
        wait = s.retry_after
        if (
            wait is not None
            and s.rate_limit_wait > 0
            and wait <= s.rate_limit_wait
            and wait < s.time_left
            and not s.probe
            and not s.waited
            and not sibling
        ):
            return Step(WAIT_RETRY, wait)
    elif in_place.startswith("once more without"):
        if s.max_tokens_droppable:
            return RETRY_WITHOUT_MAX_TOKENS
    else:
        assert in_place == "no", in_place
    return then_step(s.kind, s.key_wide)


times = st.sampled_from([0.0, 0.4, 0.5, 2.0, 2.9, 3.0, 29.0, 30.0, 60.0, 60.5, 61.0, 90.0])


@settings(max_examples=3000, deadline=None)
@given(
    kind=st.sampled_from(sorted(ERROR_KINDS)),
    key_wide=st.booleans(),
    timed_out=st.booleans(),
    retry_after=st.one_of(st.none(), times),
    probe=st.booleans(),
    retries=st.integers(0, 3),
    transient_retries=st.integers(0, 3),
    backoff=st.sampled_from([0.0, 0.5, 2.0, 2.2]),
    time_left=times,
    attempt_timeout=st.sampled_from([0.5, 1.0, 30.0]),
    rate_limit_wait=st.sampled_from([0.0, 1.0, 3.0]),
    waited=st.booleans(),
    max_tokens_droppable=st.booleans(),
    sibling=st.booleans(),
    later=st.booleans(),
    attempts_left=st.integers(-1, 3),
)
def test_decide_follows_the_readme_table(
    kind: str,
    key_wide: bool,
    timed_out: bool,
    retry_after: float | None,
    probe: bool,
    retries: int,
    transient_retries: int,
    backoff: float,
    time_left: float,
    attempt_timeout: float,
    rate_limit_wait: float,
    waited: bool,
    max_tokens_droppable: bool,
    sibling: bool,
    later: bool,
    attempts_left: int,
) -> None:
    asked: list[tuple[bool, bool]] = []

    def alternatives(same_model: bool, later_models: bool) -> bool:
        asked.append((same_model, later_models))
        return (same_model and sibling) or (later_models and later)

    s = Situation(
        kind,  # type: ignore[arg-type]
        key_wide=key_wide,
        timed_out=timed_out,
        retry_after=retry_after,
        probe=probe,
        retries=retries,
        transient_retries=transient_retries,
        backoff=backoff,
        time_left=time_left,
        attempt_timeout=attempt_timeout,
        rate_limit_wait=rate_limit_wait,
        waited=waited,
        max_tokens_droppable=max_tokens_droppable,
        alternatives=alternatives,
        attempts_left=attempts_left,
    )
    assert decide(s) == expected(s, sibling, later)
    # The chain is only consulted where the table needs it (it costs a walk).
    if kind not in ("transient", "unknown", "rate_limit"):
        assert asked == []


def test_a_probe_never_gets_a_second_attempt() -> None:
    for kind in ("transient", "unknown", "rate_limit"):
        s = Situation(kind, probe=True, retry_after=1.0, time_left=1000.0)  # type: ignore[arg-type]
        assert decide(s) in (NEXT_KEY, NEXT_MODEL)


def test_the_defaults_retry_a_fast_failure_and_not_a_silent_one() -> None:
    from router._config import RouterSettings

    d = RouterSettings()
    common = {
        "transient_retries": d.transient_retries,
        "attempt_timeout": d.attempt_timeout,
        "alternatives": lambda same_model, later: True,  # a healthy fallback
    }
    fast = Situation("transient", backoff=d.retry_backoff[0], time_left=d.timeout - 0.1, **common)  # type: ignore[arg-type]
    assert decide(fast).name == RETRY
    second = Situation(
        "transient",
        retries=1,
        backoff=d.retry_backoff[1],
        time_left=d.timeout - 1.0,
        **common,  # type: ignore[arg-type]
    )
    assert decide(second).name == RETRY
    silent = Situation(
        "transient",
        timed_out=True,
        backoff=d.retry_backoff[0],
        time_left=d.timeout - d.attempt_timeout,
        **common,  # type: ignore[arg-type]
    )
    assert decide(silent) is NEXT_MODEL
