"""Certificates: issuing the 接種証明書 (PDF) and SMART Health Cards, verifying cards, revocation, FHIR export.

Registry issues them because only registry may see names; the doses come from records through the same read
as the resident's page. A card is *stale* once records' doses (or the resident's name or birth date) differ
from what it shows; a stale card is revoked — its ``rid`` joins the revocation list — for good.

Nothing is pushed from records to registry, so registry asks: whenever anyone (no login needed) presents a
card to our verifier, and in a background sweep over every card not revoked yet, registry signs a
dose-version grant naming exactly the cards' dose ids (shared/grants.py) and records answers each dose's
current version, status and voided flag. The municipality issuing a card or reading the resident also
revokes what no longer matches.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from services.registry import fhir, service, shc
from services.registry.certificate_pdf import CertificateView, render
from services.registry.models import IssuedCertificate, Resident
from services.registry.municipalities import municipality_name
from services.registry.qr import qr_png
from services.registry.repository import CertificateRepository
from services.registry.settings import RegistrySettings
from shared.db import Databases, UnitOfWork, as_utc, utcnow
from shared.domain.dose_rules import DoseStatus
from shared.errors import Conflict, NotFound, ServiceUnavailable
from shared.grants import DoseVersionGrant, sign_grant
from shared.internal import InternalClient
from shared.schemas import MAX_DOSE_VERSION_GRANT, MAX_DOSE_VERSION_IDS, DoseSummary, DoseVersion, DoseVersionList

log = logging.getLogger(__name__)

STALE = "doses, name or birth date changed since issue"
GONE = "the resident is no longer registered"
DOSE_VOIDED = "a dose on the card was voided in the records"
DOSE_CORRECTED = "a dose on the card was corrected in the records"
DOSE_MISSING = "a dose on the card is no longer in the records"
UNCHECKED = (
    "revocation: could not be checked — the records service did not answer, so whether a dose on the card "
    "was voided or corrected is unknown; try again"
)


@dataclass(frozen=True)
class Issuer:
    """What signing and printing need, built once from settings."""

    url: str
    key: shc.IssuerKey  # the one that signs
    retired: tuple[shc.IssuerKey, ...]  # public only: still verify what they signed
    rid_secret: bytes
    font: Path
    municipalities_csv: Path | None
    grant_key: str  # ES256 private key (PEM) of registry's grants: signs the dose-version checks

    def verifying_keys(self) -> dict[str, shc.IssuerKey]:
        return {k.kid: k for k in (*self.retired, self.key)}

    @classmethod
    def from_settings(cls, settings: RegistrySettings) -> Issuer:
        return cls(
            url=settings.shc_issuer,
            key=shc.IssuerKey.load(settings.shc_private_key),
            retired=tuple(shc.IssuerKey.load_public(k) for k in settings.shc_retired_public_keys),
            rid_secret=base64.b64decode(settings.shc_rid_secret),
            font=settings.certificate_font,
            municipalities_csv=settings.municipalities_csv,
            grant_key=settings.transfer_grant_private_key,
        )


@dataclass(frozen=True)
class IssuedCard:
    certificate_id: str
    shc: str
    issued_at: datetime
    resident: Resident
    doses: list[fhir.Dose]  # every dose certified: the paper's table
    on_card: list[fhir.Dose]  # those the QR code holds: the latest of ``doses``, all of them unless too many


def certifiable(doses: Sequence[DoseSummary]) -> list[fhir.Dose]:
    """The doses a certificate shows: recorded and not voided (a dose awaiting review is not certified yet)."""
    kept = [d for d in doses if not d.voided and d.status == DoseStatus.RECORDED]
    return [_dose(d) for d in sorted(kept, key=lambda d: (d.vaccinated_on, d.dose_number, d.dose_id))]


def _dose(d: DoseSummary) -> fhir.Dose:
    return fhir.Dose(
        dose_id=d.dose_id,
        dose_number=d.dose_number,
        vaccinated_on=d.vaccinated_on,
        vaccine=d.vaccine,
        lot_number=d.lot_number,
        venue=d.venue,
        voided=d.voided,
    )


def _snapshot(doses: Sequence[DoseSummary]) -> list[dict[str, Any]]:
    by_id = {d.dose_id: d for d in doses}
    return [{"dose_id": d.dose_id, "version": by_id[d.dose_id].version} for d in certifiable(doses)]


def _subject_digest(resident: Resident) -> str:
    birth = resident.birth_date.isoformat() if resident.birth_date else ""
    return hashlib.sha256(f"{resident.name}\n{birth}".encode()).hexdigest()


def _person(resident: Resident) -> fhir.Person:
    return fhir.Person(
        municipality=resident.municipality_code,
        resident_id=resident.resident_id,
        name=resident.name,
        name_kana=resident.name_kana,
        birth_date=resident.birth_date,
        sex=resident.sex,
    )


async def issue_card(
    uow: UnitOfWork,
    records: InternalClient,
    issuer: Issuer,
    *,
    municipality_code: str,
    resident_id: str,
) -> IssuedCard:
    """The resident's current card. The same doses again give the same certificate (id, rid, issue time)."""
    resident = await service.get_resident(uow, municipality_code=municipality_code, resident_id=resident_id)
    summaries = (await service.resident_with_doses(uow, resident, records)).doses
    doses = certifiable(summaries)
    if not doses:
        raise Conflict("the resident has no recorded dose to certify")
    snapshot, subject = _snapshot(summaries), _subject_digest(resident)
    repo = CertificateRepository(uow.main())
    now = utcnow()
    live = await refresh_revocations(uow, resident, summaries)
    current = next((c for c in live if c.kid == issuer.key.kid), None)
    if current is None:
        certificate_id = str(uuid.uuid4())
        current = IssuedCertificate(
            certificate_id=certificate_id,
            municipality_code=municipality_code,
            resident_id=resident_id,
            kid=issuer.key.kid,
            rid=shc.revocation_id(issuer.rid_secret, issuer.key.kid, certificate_id),
            doses=snapshot,
            subject_digest=subject,
            # Whole seconds: the card's nbf is in seconds, and the row must say the same instant.
            issued_at=now.replace(microsecond=0),
        )
        repo.add(current)
    # SQLite returns the stored instant without its zone: read as local time it would move the card's nbf
    # (and the paper's issue date) by the host's UTC offset, and the same doses would no longer give the same card.
    issued_at = as_utc(current.issued_at)
    jws, on_card = signed_card(
        issuer.key,
        issuer=issuer.url,
        nbf=int(issued_at.timestamp()),
        rid=current.rid,
        person=_person(resident),
        doses=doses,
    )
    return IssuedCard(
        certificate_id=current.certificate_id,
        shc=shc.to_numeric(jws),
        issued_at=issued_at,
        resident=resident,
        doses=doses,
        on_card=on_card,
    )


def signed_card(
    key: shc.IssuerKey, *, issuer: str, nbf: int, rid: str, person: fhir.Person, doses: Sequence[fhir.Dose]
) -> tuple[str, list[fhir.Dose]]:
    """The card's JWS, and the doses it holds: always few enough characters for one version-22 QR code.

    The spec deprecates splitting a card over several codes, so what does not fit is left out, in a fixed
    order: first every dose's venue (the one element beyond what the spec requires), then the oldest doses,
    one at a time. The same doses thus always give the same card. ``doses`` are in date order.
    """
    # Every dose with its venue; then without venues, from all doses down to the latest one alone.
    attempts = [(list(doses), True)] + [(list(doses[first:]), False) for first in range(len(doses))]
    for shown, performers in attempts:
        bundle = fhir.card_bundle(person, shown, performers=performers)
        jws = shc.sign(shc.card_payload(issuer=issuer, nbf=nbf, bundle=bundle, rid=rid), key)
        if len(jws) <= shc.MAX_SINGLE_QR_JWS:
            return jws, shown
    raise ValueError("not even the latest dose alone fits a health card: is the issuer URL that long?")


async def refresh_revocations(
    uow: UnitOfWork, resident: Resident, summaries: Sequence[DoseSummary]
) -> list[IssuedCertificate]:
    """Revoke the resident's certificates that no longer match ``summaries`` (records' doses, just read);
    returns those still valid. Called wherever registry reads the doses anyway: issuing, the resident's page,
    the FHIR export."""
    snapshot, subject = _snapshot(summaries), _subject_digest(resident)
    repo = CertificateRepository(uow.main())
    live: list[IssuedCertificate] = []
    stale: list[IssuedCertificate] = []
    for cert in await repo.current_of(resident.municipality_code, resident.resident_id):
        (live if cert.doses == snapshot and cert.subject_digest == subject else stale).append(cert)
    await repo.revoke([c.certificate_id for c in stale], at=utcnow(), reason=STALE)
    return live


async def card_qr_png(card: IssuedCard) -> bytes:
    return await asyncio.to_thread(qr_png, card.shc)


async def certificate_pdf(card: IssuedCard, issuer: Issuer, *, issued_on: date) -> bytes:
    if not issuer.font.is_file():
        raise ServiceUnavailable(
            f"the certificate font {issuer.font} is not installed (Debian: fonts-ipaexfont; "
            "or set VRS_REGISTRY_CERTIFICATE_FONT)"
        )
    resident = card.resident
    view = CertificateView(
        certificate_id=card.certificate_id,
        name=resident.name,
        name_kana=resident.name_kana,
        birth_date=resident.birth_date,
        municipality_name=municipality_name(resident.municipality_code, issuer.municipalities_csv),
        issued_on=issued_on,
        doses=card.doses,
        shc=card.shc,
        doses_on_card=len(card.on_card),
    )
    # reportlab and the QR encoder are CPU work: keep them off the event loop.
    return await asyncio.to_thread(render, view, font_path=issuer.font)


async def fhir_export(
    uow: UnitOfWork, records: InternalClient, *, municipality_code: str, resident_id: str
) -> dict[str, Any]:
    resident = await service.get_resident(uow, municipality_code=municipality_code, resident_id=resident_id)
    # records answers with voided doses too: the export shows them as entered-in-error.
    summaries = (await service.resident_with_doses(uow, resident, records)).doses
    await refresh_revocations(uow, resident, summaries)
    return fhir.export_bundle(
        _person(resident),
        [_dose(d) for d in summaries],
        timestamp=utcnow().replace(microsecond=0).isoformat(),
    )


# --- verification and revocation ---------------------------------------------------------------------


@dataclass
class Verification:
    valid: bool
    reasons: list[str]
    claims: dict[str, Any]


async def verify(uow: UnitOfWork, records: InternalClient, issuer: Issuer, *, card: str) -> Verification:
    """Every check a verifier makes: format, key, signature, issuer, dates, then revocation.

    Revocation is checked live for a card not revoked yet, whoever asks: the resident's name and birth date
    (registry's own), and the card's doses with records through a dose-version grant. If records cannot be
    reached the card is *not* called valid: the answer says revocation could not be checked.
    """
    try:
        jws = shc.from_numeric(card)
        opened = shc.read_unverified(jws)
    except shc.CardError as exc:
        return Verification(valid=False, reasons=[f"format: {exc}"], claims={})
    claims = _claims(opened)
    reasons = _static_checks(jws, opened, issuer)
    if reasons:
        return Verification(valid=False, reasons=reasons, claims=claims)
    # Only a card we signed ever reaches the database or records.
    rid = opened.payload["vc"].get("rid")
    cert = await CertificateRepository(uow.main()).by_rid(rid) if isinstance(rid, str) else None
    if cert is None:
        return Verification(valid=False, reasons=["revocation: this issuer has no record of the card"], claims=claims)
    claims["certificate_id"] = cert.certificate_id
    if cert.revoked_at is None:
        try:
            await _revoke_if_stale(uow, records, issuer, cert)
        except ServiceUnavailable:
            return Verification(valid=False, reasons=[UNCHECKED], claims=claims)
    if cert.revoked_at is not None:
        when = as_utc(cert.revoked_at).replace(microsecond=0).isoformat()
        return Verification(valid=False, reasons=[f"revoked: {cert.revoked_reason} (revoked {when})"], claims=claims)
    return Verification(valid=True, reasons=[], claims=claims)


def _static_checks(jws: str, opened: shc.OpenedCard, issuer: Issuer) -> list[str]:
    reasons: list[str] = []
    payload = opened.payload
    key = issuer.verifying_keys().get(str(opened.header.get("kid")))
    if key is None:
        reasons.append("key: the card is not signed with a key of this issuer (unknown kid)")
    elif not shc.signature_holds(jws, key.public):
        reasons.append("signature: the signature does not match the card's contents")
    if payload.get("iss") != issuer.url:
        reasons.append(f"issuer: the card names issuer {payload.get('iss')!r}, not {issuer.url!r}")
    nbf = payload.get("nbf")
    if not isinstance(nbf, int | float):
        reasons.append("nbf: the card has no issue time")
    elif nbf > utcnow().timestamp() + 300:
        reasons.append("nbf: the card's issue time is in the future")
    vc = payload.get("vc")
    if not isinstance(vc, dict) or shc.CARD_TYPES[0] not in (vc.get("type") or []):
        reasons.append("type: the card is not a health card (vc.type)")
    elif not isinstance((vc.get("credentialSubject") or {}).get("fhirBundle"), dict):
        reasons.append("fhirBundle: the card carries no FHIR bundle")
    return reasons


async def _revoke_if_stale(uow: UnitOfWork, records: InternalClient, issuer: Issuer, cert: IssuedCertificate) -> None:
    """Raises :class:`ServiceUnavailable` when records cannot say where the card's doses stand."""
    try:
        resident = await service.get_resident(
            uow, municipality_code=cert.municipality_code, resident_id=cert.resident_id
        )
    except NotFound:
        reason: str | None = GONE
    else:
        reason = STALE if cert.subject_digest != _subject_digest(resident) else None
    if reason is None:
        changed = await dose_changes(records, issuer, [(cert.certificate_id, cert.municipality_code, cert.doses)])
        reason = changed.get(cert.certificate_id)
    if reason is not None:
        now = utcnow()
        await CertificateRepository(uow.main()).revoke([cert.certificate_id], at=now, reason=reason)
        cert.revoked_at, cert.revoked_reason = now, reason


Certified = tuple[str, str, list[dict[str, Any]]]  # (certificate id, municipality, [{"dose_id", "version"}])


async def dose_changes(records: InternalClient, issuer: Issuer, certificates: Sequence[Certified]) -> dict[str, str]:
    """certificate id → why it must be revoked, for those of ``certificates`` showing a dose that records
    has since voided, corrected or no longer holds. One records call under one grant naming exactly these
    certificates' dose ids — several, each naming some of them, when one grant would be larger than records
    accepts. Raises :class:`ServiceUnavailable` if records does not answer."""
    changed: dict[str, str] = {}
    for part in _grant_parts([c for c in certificates if c[2]]):
        changed |= await _dose_changes(records, issuer, part)
    return changed


# The signed grant is base64url of its claims (4 characters for 3 bytes) between a header and a signature:
# 1,000 characters cover those and the claims beside the certificates (iss, aud, jti, iat, exp).
_GRANT_CERTIFICATES_BYTES = (MAX_DOSE_VERSION_GRANT - 1_000) * 3 // 4


def _grant_parts(shown: Sequence[Certified]) -> list[list[Certified]]:
    """``shown`` in order, cut where a grant naming more would exceed what records accepts (its length, the
    dose ids asked about, the certificates named). Never a certificate split: a grant names all its doses."""
    parts: list[list[Certified]] = []
    part: list[Certified] = []
    size = ids = 0
    for cert in shown:
        cid, municipality, doses = cert
        named = {"certificate": cid, "municipality": municipality, "doses": [d["dose_id"] for d in doses]}
        entry = len(json.dumps(named, separators=(",", ":"))) + 1  # and its comma
        full = (
            size + entry > _GRANT_CERTIFICATES_BYTES
            or ids + len(doses) > MAX_DOSE_VERSION_IDS
            or len(part) == DoseVersionGrant.MAX_CERTIFICATES
        )
        if part and full:
            parts.append(part)
            part, size, ids = [], 0, 0
        part.append(cert)
        size, ids = size + entry, ids + len(doses)
    if part:
        parts.append(part)
    return parts


async def _dose_changes(records: InternalClient, issuer: Issuer, shown: Sequence[Certified]) -> dict[str, str]:
    # One validation for the whole grant (a sweep names hundreds of certificates).
    grant = DoseVersionGrant.model_validate(
        {
            "certificates": [
                {"certificate": cid, "municipality": m, "doses": [d["dose_id"] for d in doses]}
                for cid, m, doses in shown
            ]
        }
    )
    dose_ids = sorted(grant.dose_ids())
    status, body = await records.request(
        "POST",
        "/internal/v1/dose-versions",
        json={"grant": sign_grant(issuer.grant_key, grant), "dose_ids": dose_ids},
    )
    if status != 200:
        raise ServiceUnavailable(f"records answered {status} to a certificate check")
    now = {d.dose_id: d for d in DoseVersionList.model_validate(body).doses}
    changed: dict[str, str] = {}
    for cid, _, doses in shown:
        found = {_change(d["version"], now.get(d["dose_id"])) for d in doses} - {None}
        if found:
            changed[cid] = next(r for r in (DOSE_VOIDED, DOSE_MISSING, DOSE_CORRECTED) if r in found)
    return changed


def _change(shown_version: int, current: DoseVersion | None) -> str | None:
    if current is None:
        return DOSE_MISSING
    if current.voided:
        return DOSE_VOIDED
    if current.version != shown_version or current.status != DoseStatus.RECORDED:
        return DOSE_CORRECTED
    return None


@dataclass
class SweepPass:
    checked: int = 0
    revoked: int = 0
    skipped: bool = False  # another replica holds the sweep


async def sweep(databases: Databases, records: InternalClient, issuer: Issuer, *, batch_size: int) -> SweepPass:
    """One pass over every certificate not revoked yet, in pages of ``batch_size``: one records call per page
    (more if its grant would be too large for one), revocations committed per page. Raises
    :class:`ServiceUnavailable` (pass abandoned, what was committed stays) if records does not answer."""
    result = SweepPass()
    async with databases.main.sessionmaker() as lock, lock.begin():
        if not await CertificateRepository(lock).take_sweep_lock():
            result.skipped = True
            return result
        after = ""
        while True:
            async with databases.main.sessionmaker() as session:
                page = await CertificateRepository(session).unrevoked_after(after, limit=batch_size)
            if not page:
                return result
            changed = await dose_changes(records, issuer, page)
            result.checked += len(page)
            if changed:
                async with databases.main.sessionmaker() as session, session.begin():
                    repo, at = CertificateRepository(session), utcnow()
                    for reason in sorted(set(changed.values())):
                        await repo.revoke([c for c, r in changed.items() if r == reason], at=at, reason=reason)
                result.revoked += len(changed)
            after = page[-1][0]


async def sweep_pass(databases: Databases, records: InternalClient, issuer: Issuer, *, batch_size: int) -> None:
    """One pass of the background sweep (:func:`shared.periodic.every`): what it revoked, or that records did not
    answer (a warning: the next pass tries again), logged."""
    try:
        done = await sweep(databases, records, issuer, batch_size=batch_size)
    except ServiceUnavailable:
        log.warning("certificate sweep: records did not answer; the next pass tries again")
        return
    if done.revoked:
        log.info("certificate sweep: %d checked, %d revoked", done.checked, done.revoked)


def _claims(opened: shc.OpenedCard) -> dict[str, Any]:
    """What the card says, flattened for a person at a counter; empty parts when the card is malformed."""
    payload = opened.payload
    vc: dict[str, Any] = payload["vc"] if isinstance(payload.get("vc"), dict) else {}
    subject = vc.get("credentialSubject")
    bundle = (subject.get("fhirBundle") if isinstance(subject, dict) else None) or {}
    claims: dict[str, Any] = {
        "issuer": payload.get("iss"),
        "kid": opened.header.get("kid"),
        "issued_at": _iso(payload.get("nbf")),
        "rid": vc.get("rid"),
        "name": None,
        "birth_date": None,
        "immunizations": [],
    }
    try:
        _read_resources(bundle, claims)
    except (AttributeError, TypeError, IndexError, KeyError):
        claims["unreadable"] = "the bundle does not have the shape of a health card's"
    return claims


def _read_resources(bundle: Any, claims: dict[str, Any]) -> None:
    resources = [e.get("resource") for e in bundle.get("entry") or [] if isinstance(e, dict)]
    for resource in resources:
        if not isinstance(resource, dict):
            continue
        if resource.get("resourceType") == "Patient":
            names = resource.get("name") or [{}]
            claims["name"] = " ".join([names[0].get("family", ""), *names[0].get("given", [])]).strip()
            claims["birth_date"] = resource.get("birthDate")
        elif resource.get("resourceType") == "Immunization":
            coding = ((resource.get("vaccineCode") or {}).get("coding") or [{}])[0]
            performers = resource.get("performer") or [{}]
            claims["immunizations"].append(
                {
                    "date": resource.get("occurrenceDateTime"),
                    "vaccine_code": coding.get("code"),
                    "vaccine": _vaccine_name(coding.get("system"), coding.get("code")),
                    "lot_number": resource.get("lotNumber"),
                    "performer": (performers[0].get("actor") or {}).get("display"),
                }
            )


def _vaccine_name(system: object, code: object) -> str | None:
    if system != fhir.CVX_SYSTEM:
        return None
    return next((v.english for v in fhir.VACCINES.values() if v.cvx == code), None)


def _iso(seconds: object) -> str | None:
    if not isinstance(seconds, int | float):
        return None
    return datetime.fromtimestamp(seconds, UTC).isoformat()


async def jwks(uow: UnitOfWork, issuer: Issuer) -> dict[str, Any]:
    return {
        "keys": [k.public_jwk(crl_version=await _crl_counter(uow, k.kid)) for k in issuer.verifying_keys().values()]
    }


async def revocation_list(uow: UnitOfWork, issuer: Issuer, *, kid: str) -> dict[str, Any]:
    if kid not in issuer.verifying_keys():
        raise NotFound("no revocation list for this key id")
    repo = CertificateRepository(uow.main())
    return shc.crl(kid=kid, ctr=await _crl_counter(uow, kid), rids=await repo.revoked_rids(kid))


async def _crl_counter(uow: UnitOfWork, kid: str) -> int:
    # Revocations are never undone, so 1 + their number only grows: a cached list is current iff ctr matches.
    return 1 + await CertificateRepository(uow.main()).revoked_count(kid)
