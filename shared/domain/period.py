"""The bounds of a period a caller reads by (``from``/``to`` of the audit trail and the disclosure log)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time, timedelta

from shared.domain.japan_time import JAPAN, japan_today

BOUND_FORMAT = "must be YYYY-MM-DD or an ISO 8601 date-time"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def period_bound(value: str, *, end: bool) -> datetime:
    """``value`` as an instant in UTC. A date is a whole Japanese day, midnight to midnight in Japan (as an end, the
    next day's start: ``to`` includes its day) — the day a municipality means, as every other date in VRS; a
    date-time without a zone is Japan's time too. Returned in UTC because SQLite compares timestamps as the text of
    their UTC wall time; a moment beyond what UTC can hold is the start or the end of time. ``ValueError``
    (:data:`BOUND_FORMAT`) for anything else."""
    try:
        if "T" not in value and " " not in value:  # a day, not a moment: only as YYYY-MM-DD
            if not _DAY.fullmatch(value):
                raise ValueError(value)
            day = date.fromisoformat(value)
            if end and day == date.max:
                return datetime.max.replace(tzinfo=UTC)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time(), tzinfo=JAPAN)
        else:
            moment = datetime.fromisoformat(value)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=JAPAN)
    except ValueError:
        raise ValueError(BOUND_FORMAT) from None
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # before year 1 or after 9999 in UTC: no stored moment is beyond it
        return (datetime.min if moment.year == 1 else datetime.max).replace(tzinfo=UTC)


def kept_since(now: datetime, years: int) -> datetime:
    """The oldest moment a record must still be kept at ``now`` when records are kept ``years`` years (as the
    情報提供等記録' seven): midnight in Japan starting the same Japanese day ``years`` years before — a
    29 February's is the 28th, a day more kept, never one less. Older records may go."""
    today = japan_today(now)
    try:
        day = today.replace(year=today.year - years)
    except ValueError:  # 29 February, in a year without one
        day = today.replace(year=today.year - years, day=28)
    return datetime.combine(day, time(), tzinfo=JAPAN).astimezone(UTC)
