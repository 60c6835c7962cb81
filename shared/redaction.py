"""My Number (個人番号) never leaves a process in clear: one redactor for logs, tracebacks and the audit trail.

A My Number is twelve digits, often written in groups of four (``1234 5678 9018``, ``1234-5678-9018``).
"""

from __future__ import annotations

import re

from shared.domain.codes import is_valid_my_number, mask_my_number

MY_NUMBER_LIKE = re.compile(r"(?<!\d)\d{4}[ -]?\d{4}[ -]?\d{4}(?!\d)")


def redact_my_numbers(text: str, *, only_valid: bool = False) -> str:
    """Mask every twelve-digit run (grouped or not) as ``********9018``.

    ``only_valid``: mask only runs whose check digit makes them a possible My Number — for the audit trail,
    which must keep other twelve-digit ids exact. Logs mask every such run: a mistyped My Number is still one.
    """

    def mask(m: re.Match[str]) -> str:
        digits = m.group().replace(" ", "").replace("-", "")
        if only_valid and not is_valid_my_number(digits):
            return m.group()
        return mask_my_number(digits)

    return MY_NUMBER_LIKE.sub(mask, text)
