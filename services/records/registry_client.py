"""Who holds a coupon, asked of registry in batches and cached briefly."""

from __future__ import annotations

import time
from collections.abc import Iterable

from services.records.schemas import HolderIn
from shared.errors import ServiceUnavailable
from shared.internal import InternalClient

CouponKey = tuple[str, str]  # (issuing municipality, coupon number)


class CouponHolders:
    def __init__(self, client: InternalClient, *, cache_seconds: float) -> None:
        self._client = client
        self._ttl = cache_seconds
        self._cache: dict[CouponKey, tuple[float, HolderIn]] = {}

    async def lookup(self, coupons: Iterable[CouponKey]) -> dict[CouponKey, HolderIn | None]:
        """One registry call for every coupon not in the cache. Unknown coupons are not cached."""
        now = time.monotonic()
        out: dict[CouponKey, HolderIn | None] = {}
        missing: list[CouponKey] = []
        for key in dict.fromkeys(coupons):
            hit = self._cache.get(key)
            if hit is not None and hit[0] > now:
                out[key] = hit[1]
            else:
                missing.append(key)
        if missing:
            status, body = await self._client.request(
                "POST",
                "/internal/v1/coupon-lookups",
                json={"coupons": [{"municipality": m, "coupon_number": c} for m, c in missing]},
            )
            if status != 200:
                raise ServiceUnavailable(f"registry answered {status} to a coupon lookup")
            for result in body["results"]:
                key = (result["municipality"], result["coupon_number"])
                holder = HolderIn.model_validate(result["holder"]) if result["holder"] else None
                out[key] = holder
                if holder is not None:
                    self._cache[key] = (now + self._ttl, holder)
            if len(self._cache) > 100_000:
                self._cache.clear()
        return out

    def forget(self, key: CouponKey) -> None:
        self._cache.pop(key, None)
