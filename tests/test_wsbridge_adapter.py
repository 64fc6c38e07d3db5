"""Today's end-to-end bridge tests, with the engine (gatewayd.wsbridge) in place of bridge.Bridge.

Every test of ``tests/test_bridge.py`` that runs the gateway in this process
runs again here with ``gatewayd.connection.Bridge`` replaced by the engine
behind a tiny trio driver (``tests/wsdriver.py``): TLS clients, the real
gateway, real TCP services, the same assertions. That is the proof that the
engine behaves as the async Bridge does before the data plane drives it. (The
one test that runs the daemon as its own process cannot take the swap; its
engine-level twin is in ``tests/test_wsbridge.py``.)
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import test_bridge
from gatewayd import connection
from test_bridge import *  # noqa: F403  (the tests and their fixtures)
from wsdriver import EngineBridge

# Its own process: the patch below cannot reach it.
del test_a_violation_behind_a_data_frame_always_gets_its_close_frame  # noqa: F821


@pytest.fixture(autouse=True)
def engine_bridge(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(connection, "Bridge", EngineBridge)
    yield
    assert connection.Bridge is EngineBridge   # nothing put the old one back mid-test


def test_every_in_process_bridge_test_runs_here() -> None:
    ours = {name for name in globals() if name.startswith("test_")}
    theirs = {name for name in vars(test_bridge) if name.startswith("test_")}
    assert theirs - ours == {"test_a_violation_behind_a_data_frame_always_gets_its_close_frame"}
    assert "test_a_violation_behind_a_data_frame_gets_its_close_frame_with_the_engine" in ours


async def test_a_violation_behind_a_data_frame_gets_its_close_frame_with_the_engine(env: Env) -> None:  # noqa: F405
    # The in-process twin of the daemon test deleted above: a data frame and a
    # violation in one write while the service never stops sending.
    wrong = []
    for _ in range(20):
        for name, (violation, code) in VIOLATIONS.items():  # noqa: F405
            outcome = await fail_while_data_flows(env.gw.ports[0], env.ctx, violation)  # noqa: F405
            if not isinstance(outcome, CloseConnection) or outcome.code != code:  # noqa: F405
                wrong.append((name, outcome))
    assert not wrong, wrong[:3]
