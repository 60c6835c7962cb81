"""Logs never carry a My Number, whatever a message is built from."""

from __future__ import annotations

import logging

import pytest

from shared.observability import RedactMyNumber


@pytest.mark.parametrize(
    ("msg", "args", "expected"),
    [
        ("lookup for %s failed", ("123456789018",), "lookup for ********9018 failed"),
        ("number=123456789018;", (), "number=********9018;"),
        ("spaced 1234 5678 9018 and dashed 1234-5678-9018", (), "spaced ********9018 and dashed ********9018"),
        ("a mistyped one 123456789012 too", (), "a mistyped one ********9012 too"),
        ("coupon 1113101600000123456 ok", (), "coupon 1113101600000123456 ok"),  # 19 digits: not a My Number
        ("resident A1 updated", (), "resident A1 updated"),
    ],
)
def test_twelve_digit_runs_are_redacted(msg: str, args: tuple[object, ...], expected: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
    assert RedactMyNumber().filter(record)
    assert record.getMessage() == expected


def test_a_traceback_quoting_a_my_number_is_redacted_too() -> None:
    from shared.observability import JsonFormatter

    try:
        raise ValueError("bad input 1234-5678-9018")
    except ValueError:
        import sys

        record = logging.LogRecord("t", logging.ERROR, __file__, 1, "failed", None, sys.exc_info())
    line = JsonFormatter("t").format(record)
    assert "Traceback" in line and "********9018" in line
    assert "1234-5678-9018" not in line and "5678" not in line
