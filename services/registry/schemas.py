from __future__ import annotations

from datetime import date, timedelta
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shared.db import UtcDatetime
from shared.domain.codes import municipality_code_problem, my_number_problem
from shared.domain.coupon import coupon_number_problem
from shared.domain.japan_time import japan_today
from shared.domain.sex import Sex
from shared.grants import LegalBasis
from shared.schemas import DoseSummary

AUTO = "auto"  # coupon_number: let registry allocate one
MOVE_NOTICE_DAYS = 14
EARLIEST_MOVE = date(2021, 2, 17)  # vaccination began: an earlier move changes no coupon


class ResidentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=100)
    name_kana: str = Field(min_length=1, max_length=200)
    birth_date: date | None = None
    sex: Sex
    my_number: str | None = Field(default=None, repr=False)
    address: str | None = Field(default=None, max_length=300)
    coupon_number: str | None = Field(
        default=None, description='10 digits, or "auto": registry allocates one unless the resident already has one'
    )

    @field_validator("my_number")
    @classmethod
    def _my_number(cls, value: str | None) -> str | None:
        # The message never contains the number itself.
        if value is not None and (problem := my_number_problem(value)):
            raise ValueError(f"My Number {problem}")
        return value

    @field_validator("coupon_number")
    @classmethod
    def _coupon_number(cls, value: str | None) -> str | None:
        if value is not None and value != AUTO and (problem := coupon_number_problem(value)):
            raise ValueError(f"coupon number {problem}")
        return value

    @field_validator("birth_date")
    @classmethod
    def _birth_date(cls, value: date | None) -> date | None:
        # Japan's day, as the CSV import judges it: the server's own day is UTC's in production, and from
        # midnight to 09:00 JST it would refuse a baby born today.
        if value is not None and value > japan_today():
            raise ValueError("birth date is in the future (in Japan)")
        return value


class ResidentOut(BaseModel):
    municipality: str
    resident_id: str
    name: str
    name_kana: str
    birth_date: date | None
    sex: Sex
    my_number: str | None = Field(description="masked: only the last four digits are shown")
    address: str | None
    coupon_number: str | None
    coupon_line: str | None = Field(
        default=None, description="the 18-digit line printed on the coupon (券種 1, 回数 0: not tied to one dose)"
    )
    moved_to: str | None
    moved_on: date | None
    created_at: UtcDatetime
    updated_at: UtcDatetime


class ResidentWithDoses(ResidentOut):
    doses: list[DoseSummary]


class CertificateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["pdf", "shc"] = Field(description="pdf: the printable 接種証明書; shc: a SMART Health Card")


class CardOut(BaseModel):
    certificate_id: str
    shc: str = Field(description='the card as its QR code carries it: "shc:/" and digits')
    qr_png: str = Field(description="the QR code, a PNG, base64-encoded")


class VerifyIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    shc: str = Field(min_length=6, max_length=20_000, pattern=r"^shc:/\d+$")


class VerifyOut(BaseModel):
    valid: bool
    reasons: list[str] = Field(description="why the card is not valid; empty when it is")
    claims: dict[str, Any] = Field(description="what the card says: issuer, name, birth date, immunizations")


class ImportAccepted(BaseModel):
    import_id: str


class ImportRowError(BaseModel):
    row: int = Field(description="the file's row; the header is row 1, so the first resident is row 2")
    field: str
    message: str


class ImportStatus(BaseModel):
    import_id: str
    status: str = Field(description="running or done")
    rows_total: int = Field(description="data rows read so far (all of them once done)")
    rows_ok: int
    rows_failed: int
    errors: list[ImportRowError]
    errors_more: bool = Field(description="more errors follow: ask again with errors_after_row")
    bytes_total: int
    bytes_done: int
    created_at: UtcDatetime
    finished_at: UtcDatetime | None


class MoveOutIn(BaseModel):
    """転出: where the resident moved and the moving day (the last day their coupons are valid here)."""

    model_config = ConfigDict(extra="forbid")

    moved_to: str = Field(pattern=r"^\d{6}$", description="the new municipality's 6-digit code")
    moved_on: date

    @field_validator("moved_to")
    @classmethod
    def _moved_to(cls, value: str) -> str:
        if problem := municipality_code_problem(value):
            raise ValueError(f"municipality code {problem}")
        return value

    @field_validator("moved_on")
    @classmethod
    def _moved_on(cls, value: date) -> date:
        # A 転出届 may be filed up to 14 days before the move.
        if value > japan_today() + timedelta(days=MOVE_NOTICE_DAYS):
            raise ValueError(f"moving day is more than {MOVE_NOTICE_DAYS} days ahead")
        if value < EARLIEST_MOVE:
            raise ValueError(f"moving day is before {EARLIEST_MOVE}")
        return value


class TransferLookupIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    my_number: str = Field(repr=False)
    legal_basis: LegalBasis = Field(description="consent (本人同意) or my-number-act-19-16 (番号法第19条第16号)")

    @field_validator("my_number")
    @classmethod
    def _my_number(cls, value: str) -> str:
        if problem := my_number_problem(value):
            raise ValueError(f"My Number {problem}")
        return value


class TransferLookupItem(TransferLookupIn):
    client_id: str = Field(min_length=1, max_length=64)


class TransferLookupBatchIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lookups: list[TransferLookupItem] = Field(min_length=1, max_length=1000)


class TransferDose(BaseModel):
    municipality: str
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str


class TransferLookupOut(BaseModel):
    doses: list[TransferDose]


class TransferLookupResult(TransferLookupOut):
    client_id: str


class TransferLookupBatchOut(BaseModel):
    results: list[TransferLookupResult]


class DisclosureOut(BaseModel):
    """One transfer lookup that read a municipality's records of the resident (情報提供等記録)."""

    at: UtcDatetime
    direction: Literal["received", "provided"] = Field(
        description="received: this municipality looked the resident up and read another's records; "
        "provided: another municipality's lookup read this municipality's records"
    )
    municipality: str = Field(description="the other municipality: the one read (received) or the reader (provided)")
    legal_basis: LegalBasis
    doses: int = Field(
        description="doses shown from the municipality read; 0: its records of the person were read, with none to show"
    )
    request_id: str = Field(description="the lookup's X-Request-ID, as in the gateway's audit trail")


# Where the disclosure log's retention stands, in each read of it.
KeptFrom = Annotated[
    UtcDatetime,
    Field(
        description="the log keeps rows from this moment on (VRS_REGISTRY_DISCLOSURE_KEEP_YEARS, seven years at "
        "least): older ones are deleted"
    ),
]


class DisclosuresOut(BaseModel):
    disclosures: list[DisclosureOut] = Field(description="newest first")
    truncated: bool = Field(description="more matched than the 1,000 shown: narrow from/to")
    kept_from: KeptFrom


class MunicipalityDisclosureOut(DisclosureOut):
    """One row of a municipality's whole disclosure log: :class:`DisclosureOut` with its own resident's id."""

    id: int = Field(description="the row's number in the log; before_id=<the last one seen> reads the next page")
    resident_id: str = Field(description="this municipality's resident: the one looked up, or whose records were read")


class MunicipalityDisclosuresOut(BaseModel):
    disclosures: list[MunicipalityDisclosureOut] = Field(description="newest first")
    more: bool = Field(description="more follow: ask again with before_id set to the last id shown")
    kept_from: KeptFrom


class CouponReissueIn(BaseModel):
    """A lost coupon: a new number replaces ``replaces``, which is invalid from today. Naming the number
    being replaced makes a retry harmless: once it is replaced, the same request changes nothing."""

    model_config = ConfigDict(extra="forbid")

    replaces: str = Field(pattern=r"^\d{10}$")
    coupon_number: str | None = Field(default=None, description="the new number; allocated when absent")

    @field_validator("coupon_number")
    @classmethod
    def _coupon_number(cls, value: str | None) -> str | None:
        if value is not None and (problem := coupon_number_problem(value)):
            raise ValueError(f"coupon number {problem}")
        return value
