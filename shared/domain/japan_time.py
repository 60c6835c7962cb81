"""Japan's calendar day: dates on coupons and tablets are Japanese days, 'the future' starts at midnight JST."""

from __future__ import annotations

from datetime import date, datetime
from zoneinfo import ZoneInfo

JAPAN = ZoneInfo("Asia/Tokyo")


def japan_today(now: datetime | None = None) -> date:
    """Today in Japan, or the Japanese day of ``now`` (which must be timezone-aware)."""
    if now is None:
        return datetime.now(JAPAN).date()
    if now.tzinfo is None:
        raise ValueError("a naive datetime has no place in time; pass a timezone-aware one")
    return now.astimezone(JAPAN).date()
