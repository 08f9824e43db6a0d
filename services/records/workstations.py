"""`/v1/records/workstations/{ae_title}`: the diagnostic workstations operations allow to query and retrieve
over DIMSE (qr_scp.py), each bound to one principal whose cases it sees. Operations only: binding an AE title
to a specialist hands that AE the specialist's cases."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Path, Response
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from services.auth.deps import require_role
from services.auth.models import Role
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.db import utcnow
from services.records.api import SessionDep
from services.records.models import DicomWorkstation
from services.records.qr_scp import AE_TITLE, Workstation, WorkstationBinding

router: APIRouter = APIRouter(
    prefix="/v1/records/workstations",
    tags=["records"],
    dependencies=[Depends(require_role(Role.OPERATIONS))],
    responses=AUTH_ERRORS,
    route_class=AuthRoute,
)
AeTitle = Annotated[str, Path(pattern=AE_TITLE, description="the workstation's calling AE title")]
UNKNOWN = "no workstation has this AE title; PUT one first"


@router.put("/{ae_title}", responses={422: {"description": "the binding is incomplete (no specialist_id)"}})
def put_workstation(ae_title: AeTitle, body: WorkstationBinding, session: SessionDep) -> Workstation:
    """Allow the workstation `ae_title` to query and retrieve, from `host`, as the principal it is bound to."""
    station = Workstation.model_validate({**body.model_dump(), "ae_title": ae_title})
    try:
        return _replace(session, station)
    except IntegrityError:
        session.rollback()  # created by a PUT that looked at the same time, and committed first
        return _replace(session, station)


def _replace(session: Session, station: Workstation) -> Workstation:
    row = session.get(DicomWorkstation, station.ae_title, with_for_update=True) or DicomWorkstation(
        ae_title=station.ae_title, host=station.host, role=station.role
    )
    for key, value in station.model_dump().items():
        setattr(row, key, value)
    row.updated_at = utcnow()
    session.add(row)
    session.commit()
    return station


@router.get("/{ae_title}", responses={404: {"description": UNKNOWN}})
def get_workstation(ae_title: AeTitle, session: SessionDep) -> Workstation:
    row = session.get(DicomWorkstation, ae_title)
    if row is None:
        raise HTTPException(404, UNKNOWN)
    return Workstation.model_validate(row, from_attributes=True)


@router.delete("/{ae_title}", status_code=204, responses={404: {"description": UNKNOWN}})
def delete_workstation(ae_title: AeTitle, session: SessionDep) -> Response:
    """Stop the workstation querying: its next association is rejected."""
    row = session.get(DicomWorkstation, ae_title)
    if row is None:
        raise HTTPException(404, UNKNOWN)
    session.delete(row)
    session.commit()
    return Response(status_code=204)
