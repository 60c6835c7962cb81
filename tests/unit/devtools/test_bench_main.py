"""``python -m devtools.bench``: options go with one area; a typo or --help never starts minutes of load."""

import pytest

from devtools.bench import __main__ as bench


@pytest.mark.parametrize(
    ("argv", "status"), [(["--help"], 0), (["-h"], 0), (["--bogus"], 2), (["records", "stats", "--duration", "5"], 2)]
)
def test_options_without_exactly_one_area_print_the_usage_and_run_nothing(
    argv: list[str], status: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("importlib.import_module", lambda name: pytest.fail(f"{name} was started"))
    assert bench.main(argv) == status
    assert "options (and --help) go with exactly one area" in capsys.readouterr().err


def test_an_area_name_after_an_option_is_the_option_s_value(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[str, list[str]]] = []

    class Area:
        def __init__(self, name: str) -> None:
            self.name = name

        def main(self, argv: list[str]) -> int:
            started.append((self.name, argv))
            return 0

    monkeypatch.setattr("importlib.import_module", lambda name: Area(name))
    assert bench.main(["gateway", "--upstream", "records"]) == 0
    assert started == [("devtools.bench.gateway", ["--upstream", "records"])]
