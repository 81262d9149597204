"""Fixtures of the remote-tier tests: kvtier servers started on loopback and killed at teardown."""
from __future__ import annotations

import pytest

from tests.remote.servers import ServerProc


@pytest.fixture
def kvservers():
    """Factory: ``kvservers(n, *args)`` starts n servers; all are killed at teardown."""
    started: list[ServerProc] = []

    def start(n: int = 1, *args: str, host: str = "127.0.0.1") -> list[ServerProc]:
        out = []
        for _ in range(n):
            s = ServerProc(list(args), host=host)
            started.append(s)
            out.append(s.start())
        return out

    start.all = started
    yield start
    for s in started:
        s.kill()
