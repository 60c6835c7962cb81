"""The open-loop run's rate is a share of the single-dose max measured just before it, in the state it runs in:
the first max was measured on a nearly empty database, and the open loop ran after some 300,000 more doses,
when the same rate was a larger share of what the system could do."""

from devtools.bench.core import LoadResult
from devtools.bench.records import Report, fixed_max, fixed_rate, parse_args


def _measured(rate: float) -> LoadResult:
    result = LoadResult(name="max-again", window=10.0)
    result.ok_in_window = int(rate * 10)
    return result


def test_the_share_is_of_the_max_measured_again_not_the_first() -> None:
    report = Report(single=_measured(1600.0), max_again=_measured(1400.0))
    args = parse_args([])
    assert fixed_max(report, args) == 1400.0
    assert fixed_rate(report, args) == 0.8 * 1400.0


def test_a_rate_given_is_the_max() -> None:
    report = Report(single=_measured(1600.0), max_again=None)
    args = parse_args(["--fixed-rate", "1000", "--fixed-share", "0.5"])
    assert fixed_rate(report, args) == 500.0


def test_no_max_measured_no_open_loop_run() -> None:
    assert fixed_rate(Report(), parse_args([])) == 0.0
