"""Logs never carry a My Number, whatever a message is built from."""

from __future__ import annotations

import logging

import pytest

from shared.observability import RedactMyNumber


@pytest.mark.parametrize(
    ("msg", "args", "expected"),
    [
        ("lookup for %s failed", ("123456789018",), "lookup for ************ failed"),
        ("number=123456789018;", (), "number=************;"),
        ("coupon 1113101600000123456 ok", (), "coupon 1113101600000123456 ok"),  # 19 digits: not a My Number
        ("resident A1 updated", (), "resident A1 updated"),
    ],
)
def test_twelve_digit_runs_are_redacted(msg: str, args: tuple[object, ...], expected: str) -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, msg, args, None)
    assert RedactMyNumber().filter(record)
    assert record.getMessage() == expected
