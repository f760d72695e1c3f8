"""Fixtures several test modules share: the provider emulator and a redis-server, each
a real process started once per module (module scope) and stopped after it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_gateway import Proc
from test_shared import RedisServer


@pytest.fixture(scope="module")
def emulator() -> Iterator[Proc]:
    """`python -m router.emulator` on a free loopback port."""
    proc = Proc(["-m", "router.emulator", "--port", "0"], "http://")
    try:
        yield proc
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of its own (see `test_shared.RedisServer`)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    try:
        yield server
    finally:
        server.stop()
