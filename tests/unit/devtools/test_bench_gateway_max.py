"""The gateway bench's max rows: a closed loop at each number of connections of the sweep, the best rate kept, and
every count's rate shown."""

from __future__ import annotations

from typing import Any

import pytest

from devtools.bench import gateway
from devtools.bench.gateway import Result, Target, run_max


@pytest.mark.parametrize(
    ("rates", "best"),
    [({32: 2000.0, 64: 3000.0, 128: 2900.0}, 64), ({32: 4000.0, 64: 3000.0}, 32), ({128: 10.0}, 128)],
)
def test_the_best_rate_of_the_sweep_is_the_row_s(
    monkeypatch: pytest.MonkeyPatch, rates: dict[int, float], best: int
) -> None:
    ran: list[int] = []

    def load(target: Target, *, connections: int, seconds: float, meter: Any = None) -> Result:
        ran.append(connections)
        return Result(int(rates[connections] * seconds), 0, seconds, [connections / 1000])

    monkeypatch.setattr(gateway, "run_load", load)
    result = run_max(Target("GET", "http://x/", {}, 200), sweep=list(rates), seconds=2.0)
    assert ran == list(rates)
    assert result.rate == rates[best]
    assert result.latencies == [best / 1000]  # the best load's own figures, not a mix
    assert result.sweep == rates
