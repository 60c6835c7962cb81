"""A certificate check's question to records always fits what records accepts, however large the sweep's page."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from services.registry import certificates, shc
from services.registry.settings import DEV_SHC_PRIVATE_KEY
from shared.grants import DEV_PRIVATE_KEY, DEV_PUBLIC_KEY, DoseVersionGrant, open_grant
from shared.schemas import MAX_DOSE_VERSION_GRANT, DoseVersionsIn

ISSUER = certificates.Issuer(
    url="https://vrs.example.jp/issuer",
    key=shc.IssuerKey.load(DEV_SHC_PRIVATE_KEY),
    retired=(),
    rid_secret=b"s" * 32,
    font=Path("/nonexistent"),
    municipalities_csv=None,
    grant_key=DEV_PRIVATE_KEY,
)


class StrictRecords:
    """records' dose-version check as records validates it: the request's schema, then the grant; every dose is
    still at version 1."""

    def __init__(self) -> None:
        self.grant_lengths: list[int] = []
        self.asked: list[str] = []

    async def request(self, method: str, path: str, json: Any = None, **_: Any) -> tuple[int, Any]:
        body = DoseVersionsIn.model_validate(json)  # raises, as records answers 422, on a grant too long
        named = open_grant(DEV_PUBLIC_KEY, body.grant, DoseVersionGrant).dose_ids()
        assert set(body.dose_ids) == named.keys()
        self.grant_lengths.append(len(body.grant))
        self.asked += body.dose_ids
        doses = [{"dose_id": d, "version": 1, "status": "recorded", "voided": False} for d in body.dose_ids]
        return 200, {"doses": doses}


def page(cards: int, doses: int) -> list[certificates.Certified]:
    return [
        (str(uuid.uuid4()), "131016", [{"dose_id": str(uuid.uuid4()), "version": 1} for _ in range(doses)])
        for _ in range(cards)
    ]


@pytest.mark.parametrize(
    ("cards", "doses", "calls"),
    [
        (1, 1, 1),
        (500, 2, 1),  # the default page of two-dose cards: one call
        (1000, 7, 1),  # some 470,000 characters: still one grant
        (1000, 8, 2),  # some 535,000 characters: two
        (1000, 50, 6),  # the largest page (1,000 cards, 50 doses each — the grant's limit): 2.6 M characters
    ],
)
async def test_a_page_is_asked_in_as_few_grants_as_fit_what_records_accepts(cards: int, doses: int, calls: int) -> None:
    records = StrictRecords()
    asked = page(cards, doses)
    changed = await certificates.dose_changes(records, ISSUER, asked)  # type: ignore[arg-type]
    assert changed == {}
    assert len(records.grant_lengths) == calls
    assert max(records.grant_lengths) <= MAX_DOSE_VERSION_GRANT
    assert sorted(records.asked) == sorted(d["dose_id"] for _, _, ds in asked for d in ds)  # each dose once
