"""The specialist directory's API schema and its FHIR R4 Practitioner / PractitionerRole views."""

from __future__ import annotations

import json
from datetime import date
from typing import Annotated, Any

from fhir.resources.R4B.practitioner import Practitioner
from fhir.resources.R4B.practitionerrole import PractitionerRole
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from contracts.triage import Subspecialty
from services.review.models import Specialist

NPI_SYSTEM = "http://hl7.org/fhir/sid/us-npi"
SUBSPECIALTY_SYSTEM = "urn:secondopinion:subspecialty"
PLAN_SYSTEM = "urn:secondopinion:in-network-plan"

State = Annotated[str, StringConstraints(pattern=r"^[A-Z]{2}$")]
PlanCode = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=50)]


class OutOfOffice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: date
    end: date

    @model_validator(mode="after")
    def ends_after_start(self) -> OutOfOffice:
        if self.end < self.start:
            raise ValueError("end is before start; give the first and last day away")
        return self


class SpecialistIn(BaseModel):
    """The body of POST /v1/specialists and PUT /v1/specialists/{id}."""

    model_config = ConfigDict(extra="forbid")

    display_name: str = Field(min_length=1, max_length=200)
    credentials: str = Field(min_length=1, max_length=100)
    npi: str = Field(pattern=r"^\d{10}$")
    subspecialties: list[Subspecialty] = Field(min_length=1)
    licensed_states: list[State] = Field(min_length=1)
    organization: str = Field(min_length=1, max_length=200)
    academic: bool = False
    max_open_reviews: int = Field(default=5, ge=0, le=100)
    active: bool = True
    payer_networks: list[PlanCode] = Field(default_factory=list)
    out_of_office: list[OutOfOffice] = Field(default_factory=list)

    def columns(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


class SpecialistCreate(SpecialistIn):
    id: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{1,49}$", description="e.g. spec-gyn-3")


class NotInDirectory(LookupError):
    """No specialist with this id."""


class AlreadyInDirectory(ValueError):
    """A specialist with this id exists already."""


# The directory's changes, for its HTTP API (operations' keys) and the operators' console command alike. Each
# commits; a specialist is never deleted (their past reviews keep pointing at them), only taken out of matching.


def add(session: Session, body: SpecialistCreate) -> Specialist:
    if session.get(Specialist, body.id) is not None:
        raise AlreadyInDirectory(f"specialist {body.id} already exists")
    specialist = Specialist(**body.columns())
    session.add(specialist)
    try:
        session.commit()
    except IntegrityError as exc:  # added by a request that looked at the same time, and committed first
        session.rollback()
        raise AlreadyInDirectory(f"specialist {body.id} already exists") from exc
    return specialist


def replace(session: Session, specialist_id: str, body: SpecialistIn) -> Specialist:
    specialist = found(session, specialist_id)
    for name, value in body.columns().items():
        setattr(specialist, name, value)
    session.add(specialist)
    session.commit()
    return specialist


def deactivate(session: Session, specialist_id: str) -> Specialist:
    specialist = found(session, specialist_id)
    specialist.active = False
    session.add(specialist)
    session.commit()
    return specialist


def found(session: Session, specialist_id: str) -> Specialist:
    specialist = session.get(Specialist, specialist_id)
    if specialist is None:
        raise NotInDirectory(f"no specialist {specialist_id} in the directory")
    return specialist


def practitioner(s: Specialist) -> dict[str, Any]:
    resource = Practitioner.model_validate(
        {
            "resourceType": "Practitioner",
            "id": s.id,
            "identifier": [{"system": NPI_SYSTEM, "value": s.npi}],
            "active": s.active,
            "name": [{"text": f"{s.display_name}, {s.credentials}", "suffix": [s.credentials]}],
            "qualification": [
                {
                    "code": {"text": f"Medical licence, {state}"},
                    "issuer": {"display": f"{state} medical board"},
                }
                for state in s.licensed_states
            ],
        }
    )
    return json.loads(resource.model_dump_json())


def practitioner_role(s: Specialist) -> dict[str, Any]:
    resource = PractitionerRole.model_validate(
        {
            "resourceType": "PractitionerRole",
            "id": s.id,
            "active": s.active,
            "practitioner": {"reference": f"Practitioner/{s.id}", "display": s.display_name},
            "organization": {"display": s.organization},
            "code": [{"text": "Second-opinion reader, diagnostic ultrasound"}],
            "specialty": [
                {"coding": [{"system": SUBSPECIALTY_SYSTEM, "code": sub}], "text": sub.replace("_", " ")}
                for sub in s.subspecialties
            ],
            "notAvailable": [
                {"description": "out of office", "during": {"start": p["start"], "end": p["end"]}}
                for p in s.out_of_office
            ],
            "extension": [{"url": PLAN_SYSTEM, "valueString": plan} for plan in s.payer_networks],
        }
    )
    return json.loads(resource.model_dump_json())
