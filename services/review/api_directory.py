"""HTTP API of the specialist directory for operations, and its FHIR Practitioner / PractitionerRole reads."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import JSONResponse
from sqlmodel import select

from services.auth import Role, authenticate, require_role
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.fhir import FhirJsonResponse, fhir_resource_answer
from services.common.http import fhir_json_only
from services.review import directory
from services.review.deps import SessionDep
from services.review.diagnostic_report import FHIR_JSON, operation_outcome
from services.review.directory import SpecialistCreate, SpecialistIn, practitioner, practitioner_role
from services.review.models import Specialist, SpecialistPublic

# The directory is read by specialists and operations and changed by operations only; the FHIR
# Practitioner views (names and credentials, no PHI) by any key.
specialists = APIRouter(
    prefix="/v1/specialists",
    tags=["specialists"],
    dependencies=[Depends(require_role(Role.SPECIALIST, Role.OPERATIONS))],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
fhir_practitioners = APIRouter(
    prefix="/fhir",
    tags=["fhir"],
    dependencies=[Depends(authenticate), Depends(fhir_json_only)],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
OPERATIONS_ONLY = [Depends(require_role(Role.OPERATIONS))]


@specialists.get("", response_model=list[SpecialistPublic])
def list_specialists(session: SessionDep) -> list[Specialist]:
    return list(session.exec(select(Specialist).order_by(Specialist.id)).all())


@specialists.post(
    "", status_code=201, response_model=SpecialistPublic, responses={409: {}}, dependencies=OPERATIONS_ONLY
)
def create_specialist(body: SpecialistCreate, session: SessionDep) -> Specialist:
    try:
        return directory.add(session, body)
    except directory.AlreadyInDirectory as exc:
        raise HTTPException(409, f"{exc}; PUT /v1/specialists/{body.id} updates") from exc


@specialists.get("/{specialist_id}", response_model=SpecialistPublic, responses={404: {}})
def read_specialist(specialist_id: str, session: SessionDep) -> Specialist:
    try:
        return directory.found(session, specialist_id)
    except directory.NotInDirectory as exc:
        raise _not_found() from exc


@specialists.put(
    "/{specialist_id}", response_model=SpecialistPublic, responses={404: {}}, dependencies=OPERATIONS_ONLY
)
def update_specialist(specialist_id: str, body: SpecialistIn, session: SessionDep) -> Specialist:
    try:
        return directory.replace(session, specialist_id, body)
    except directory.NotInDirectory as exc:
        raise _not_found() from exc


@specialists.delete(
    "/{specialist_id}", response_model=SpecialistPublic, responses={404: {}}, dependencies=OPERATIONS_ONLY
)
def deactivate_specialist(specialist_id: str, session: SessionDep) -> Specialist:
    """Take the specialist out of matching; their past reviews keep pointing at them, so nothing is deleted."""
    try:
        return directory.deactivate(session, specialist_id)
    except directory.NotInDirectory as exc:
        raise _not_found() from exc


@fhir_practitioners.get(
    "/Practitioner/{specialist_id}",
    response_class=FhirJsonResponse,
    responses=fhir_resource_answer("Practitioner", "the specialist as a FHIR R4 Practitioner"),
)
def read_practitioner(specialist_id: str, session: SessionDep) -> JSONResponse:
    return _fhir(session, specialist_id, "Practitioner", practitioner)


@fhir_practitioners.get(
    "/PractitionerRole/{specialist_id}",
    response_class=FhirJsonResponse,
    responses=fhir_resource_answer("PractitionerRole", "the specialist as a FHIR R4 PractitionerRole"),
)
def read_practitioner_role(specialist_id: str, session: SessionDep) -> JSONResponse:
    return _fhir(session, specialist_id, "PractitionerRole", practitioner_role)


def _fhir(session: SessionDep, specialist_id: str, kind: str, view: Any) -> JSONResponse:
    specialist = session.get(Specialist, specialist_id)
    if specialist is None:
        outcome = operation_outcome("not-found", f"no {kind} with this id; GET /v1/specialists lists them")
        return JSONResponse(outcome, status_code=404, media_type=FHIR_JSON)
    return JSONResponse(view(specialist), media_type=FHIR_JSON)


def _not_found() -> HTTPException:
    return HTTPException(404, "no specialist with this id in the directory; GET /v1/specialists lists them")
