"""The bounds of a period a caller reads by (``from``/``to`` of the audit trail and the disclosure log)."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta

BOUND_FORMAT = "must be YYYY-MM-DD or an ISO 8601 date-time"


def period_bound(value: str, *, end: bool) -> datetime:
    """``value`` as an instant in UTC: a date is a whole UTC day (as an end, the next day's start: ``to`` includes
    its day), a date-time without a zone is UTC. In UTC because SQLite compares timestamps as the text of their
    UTC wall time. ``ValueError`` (:data:`BOUND_FORMAT`) for anything else."""
    try:
        if len(value) == 10:
            start = datetime.combine(date.fromisoformat(value), time(), tzinfo=UTC)
            if end:
                return start + timedelta(days=1) if start.date() < date.max else datetime.max.replace(tzinfo=UTC)
            return start
        moment = datetime.fromisoformat(value)
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except (ValueError, OverflowError):  # OverflowError: a zone's time before year 1 in UTC
        raise ValueError(BOUND_FORMAT) from None
