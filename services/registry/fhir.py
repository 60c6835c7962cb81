"""FHIR R4 resources for a resident's vaccinations: the minimal bundle inside a health card, and the export.

Pure: what goes in is a resident's name, birth date and doses; what comes out is JSON-ready dicts.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

CVX_SYSTEM = "http://hl7.org/fhir/sid/cvx"
RESIDENT_ID_SYSTEM = "urn:vrs:resident-id:"  # + municipality code: 個別宛名番号 is unique within one municipality
DOSE_ID_SYSTEM = "urn:vrs:dose-id"
_NAME_SPLIT = re.compile(r"[ \u3000]+")
_VRS_NAMESPACE = uuid.UUID("6f1c1c55-2a0b-4b57-9c38-3c0f1b2c9a10")


@dataclass(frozen=True, slots=True)
class Vaccine:
    cvx: str
    english: str  # as on an international certificate


# CDC's CVX codes, the code system SMART Health Card verifiers expect.
VACCINES: dict[str, Vaccine] = {
    "pfizer": Vaccine("208", "Pfizer-BioNTech COVID-19 (Comirnaty)"),
    "moderna": Vaccine("207", "Moderna COVID-19 (Spikevax)"),
    "astrazeneca": Vaccine("210", "AstraZeneca COVID-19 (Vaxzevria)"),
    "novavax": Vaccine("211", "Novavax COVID-19 (Nuvaxovid)"),
}
GENDER = {"M": "male", "F": "female", "U": "unknown"}


@dataclass(frozen=True, slots=True)
class Dose:
    dose_id: str
    dose_number: int
    vaccinated_on: date
    vaccine: str
    lot_number: str
    venue: str | None
    voided: bool


@dataclass(frozen=True, slots=True)
class Person:
    municipality: str
    resident_id: str
    name: str
    name_kana: str
    birth_date: date | None
    sex: str


def human_name(name: str) -> dict[str, Any]:
    """氏名 as registered, "山田 花子": family name first, separated by a space (half or full width)."""
    family, *given = _NAME_SPLIT.split(name.strip())
    out: dict[str, Any] = {"family": family}
    if given:
        out["given"] = given
    return out


def vaccine_code(product: str, *, display: bool) -> dict[str, Any]:
    vaccine = VACCINES.get(product)
    if vaccine is None:
        raise ValueError(f"no CVX code is known for product {product!r}")
    coding: dict[str, Any] = {"system": CVX_SYSTEM, "code": vaccine.cvx}
    if display:
        coding["display"] = vaccine.english
    return {"coding": [coding]}


def card_bundle(person: Person, doses: Sequence[Dose], *, performers: bool = True) -> dict[str, Any]:
    """The health card's bundle, minimised as the spec requires for QR codes.

    No ids, meta, text or displays; ``resource:N`` references; the Patient has only name and birth date.
    ``performers=False`` leaves out the venues, the one element the spec does not ask for.
    """
    patient: dict[str, Any] = {"resourceType": "Patient", "name": [human_name(person.name)]}
    if person.birth_date is not None:
        patient["birthDate"] = person.birth_date.isoformat()
    entries: list[dict[str, Any]] = [{"fullUrl": "resource:0", "resource": patient}]
    for i, dose in enumerate(doses, start=1):
        immunization: dict[str, Any] = {
            "resourceType": "Immunization",
            "status": "completed",
            "vaccineCode": vaccine_code(dose.vaccine, display=False),
            "patient": {"reference": "resource:0"},
            "occurrenceDateTime": dose.vaccinated_on.isoformat(),
        }
        if dose.venue and performers:
            immunization["performer"] = [{"actor": {"display": dose.venue}}]
        immunization["lotNumber"] = dose.lot_number
        entries.append({"fullUrl": f"resource:{i}", "resource": immunization})
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def patient_uuid(municipality: str, resident_id: str) -> uuid.UUID:
    """A stable id for the resident that reveals nothing: the same export twice gives the same bundle."""
    return uuid.uuid5(_VRS_NAMESPACE, f"{municipality}/{resident_id}")


def export_bundle(person: Person, doses: Sequence[Dose], *, timestamp: str) -> dict[str, Any]:
    """The resident's whole immunization history, voided doses as ``entered-in-error``."""
    pid = str(patient_uuid(person.municipality, person.resident_id))
    patient: dict[str, Any] = {
        "resourceType": "Patient",
        "id": pid,
        "identifier": [{"system": RESIDENT_ID_SYSTEM + person.municipality, "value": person.resident_id}],
        "name": [
            {"use": "official", **human_name(person.name), "text": person.name},
            {"use": "usual", "text": person.name_kana},  # カナ
        ],
        "gender": GENDER[person.sex],
    }
    if person.birth_date is not None:
        patient["birthDate"] = person.birth_date.isoformat()
    entries: list[dict[str, Any]] = [{"fullUrl": f"urn:uuid:{pid}", "resource": patient}]
    for dose in sorted(doses, key=lambda d: (d.vaccinated_on, d.dose_number, d.dose_id)):
        immunization: dict[str, Any] = {
            "resourceType": "Immunization",
            "id": dose.dose_id,
            "identifier": [{"system": DOSE_ID_SYSTEM, "value": dose.dose_id}],
            "status": "entered-in-error" if dose.voided else "completed",
            "vaccineCode": vaccine_code(dose.vaccine, display=True),
            "patient": {"reference": f"urn:uuid:{pid}"},
            "occurrenceDateTime": dose.vaccinated_on.isoformat(),
            "lotNumber": dose.lot_number,
            "protocolApplied": [{"doseNumberPositiveInt": dose.dose_number}],
        }
        if dose.venue:
            immunization["performer"] = [{"actor": {"display": dose.venue}}]
        entries.append({"fullUrl": f"urn:uuid:{dose.dose_id}", "resource": immunization})
    return {"resourceType": "Bundle", "type": "collection", "timestamp": timestamp, "entry": entries}
