"""Signed links to one instance (services.auth.signed_links): `POST …/instances/{sop}/links` with a key that may
read the instance answers short-lived URLs of its rendered image, thumbnail, frames, MP4 (a video clip), WebM
(a video clip or a cine stored as frames) and WADO-URI forms, each usable without an `Authorization` header (a browser `<img>` / `<video>`, an EHR link) and
served as that key's own request would be. The route is on `dicomweb.router`: the case scope and audit of the
key apply (another partner's case is a 404).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any

import pydicom
from fastapi import APIRouter, Body, Depends, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from services.auth import Caller
from services.auth.problems import problem_response
from services.auth.routing import AuthRoute
from services.auth.signed_links import SignedLinkSettings, get_link_settings, sign
from services.records.api import SessionDep, SettingsDep
from services.records.dicomweb import VIDEO_TYPES, CaseId, Uid, _retrievable
from services.records.rendering import (
    RENDERED_TYPES,
    NotRendered,
    parse_quality,
    parse_viewport,
    parse_window,
)
from services.records.store import ObjectStore
from services.records.video import MP4, WEBM

router: APIRouter = APIRouter(route_class=AuthRoute)
LinkSettingsDep = Annotated[SignedLinkSettings, Depends(get_link_settings)]
WADO_CONTENT_TYPES = ("application/dicom", *RENDERED_TYPES, MP4, WEBM)


class LinkRequest(BaseModel):
    """What the links are for: how long they live, and how the rendered image and thumbnail are drawn. Every
    parameter is signed into the links: a client cannot add or change one later."""

    model_config = ConfigDict(extra="forbid")

    expires_in: int | None = Field(
        default=None,
        ge=1,
        description="seconds the links live; at most (and by default) RECORDS_LINK_MAX_SECONDS (300)",
    )
    accept: str | None = Field(
        default=None,
        description="image/jpeg (default), image/png or image/gif: the rendered image's and thumbnail's type "
        "(signed into them as the `accept` parameter)",
    )
    viewport: str | None = Field(default=None, description="the rendered image's and thumbnail's viewport")
    window: str | None = Field(default=None, description="the rendered image's VOI window (center,width)")
    quality: str | None = Field(default=None, description="JPEG quality of the rendered image, 1 to 100")
    wado_content_type: str | None = Field(
        default=None,
        description="contentType of the WADO-URI link: application/dicom, image/jpeg, image/png, image/gif or "
        "video/mp4 or video/webm; left out, the server decides (an image renders as JPEG)",
    )


class SignedLinks(BaseModel):
    """URLs of one instance, usable without a key until `expires_at`, for GET (and HEAD) only."""

    key_id: str = Field(description="the key they were issued for (its audit entries, rate and access apply)")
    expires_at: datetime
    expires_in: int = Field(description="seconds from now")
    rendered: str = Field(description="WADO-RS rendered (an image, or a video clip's MP4)")
    thumbnail: str
    frames: str | None = Field(description="WADO-RS frames (multipart, every frame); null without pixel data")
    mp4: str | None = Field(description="the clip as video/mp4 (Range requests answered); null if no clip")
    webm: str | None = Field(
        default=None,
        description="a video clip, or a cine stored as frames, as video/webm (VP9, Range requests answered); "
        "null for a single image or no image",
    )
    wado_uri: str


LINKS_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: problem_response(
        400, "expires_in over the maximum, or a rendering parameter that does not parse", "expires_in is …"
    ),
    404: {"description": "nothing released in a case visible to this key has these UIDs"},
}


@router.post(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/links",
    response_model=SignedLinks,
    responses=LINKS_RESPONSES,
)
def issue_links(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    sop: Uid,
    caller: Caller,
    session: SessionDep,
    settings: SettingsDep,
    link_settings: LinkSettingsDep,
    asked: Annotated[LinkRequest | None, Body()] = None,
) -> SignedLinks:
    asked = asked or LinkRequest()
    lifetime = asked.expires_in or link_settings.max_seconds
    if lifetime > link_settings.max_seconds:
        raise HTTPException(
            400,
            f"expires_in is at most {link_settings.max_seconds} s (RECORDS_LINK_MAX_SECONDS); ask for less",
        )
    rendering = _rendering_params(asked)
    if asked.wado_content_type is not None and asked.wado_content_type not in WADO_CONTENT_TYPES:
        raise HTTPException(400, f"wado_content_type is one of {', '.join(WADO_CONTENT_TYPES)}")
    files, _ = _retrievable(session, case_id, study, series, sop)
    row = files[-1]
    header = pydicom.dcmread(
        ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256), stop_before_pixels=True
    )
    video = header.file_meta.get("TransferSyntaxUID") in VIDEO_TYPES
    count = 1 if video else int(header.get("NumberOfFrames") or 1)
    expires = int(time.time()) + lifetime
    instance = f"/dicomweb/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}"

    def link(path: str, params: dict[str, str] | None = None) -> str:
        return (
            f"{settings.records_url}{path}?{sign(path, params or {}, caller.key_id, expires, link_settings)}"
        )

    thumbnail = {k: v for k, v in rendering.items() if k in ("accept", "viewport")}
    wado = {"requestType": "WADO", "studyUID": study, "seriesUID": series, "objectUID": sop}
    if asked.wado_content_type:
        wado["contentType"] = asked.wado_content_type
    return SignedLinks(
        key_id=caller.key_id,
        expires_at=datetime.fromtimestamp(expires, UTC),
        expires_in=lifetime,
        rendered=link(f"{instance}/rendered", {} if video else rendering),
        thumbnail=link(f"{instance}/thumbnail", thumbnail),
        frames=link(f"{instance}/frames/{','.join(str(n) for n in range(1, count + 1))}")
        if "Rows" in header
        else None,
        mp4=link(f"{instance}/rendered", {"accept": MP4}) if video else None,
        webm=link(f"{instance}/rendered", {"accept": WEBM}) if video or count > 1 else None,
        wado_uri=link("/dicomweb/wado", wado),
    )


def _rendering_params(asked: LinkRequest) -> dict[str, str]:
    """The rendering parameters asked for, checked as the rendered routes check them (a 400 naming one)."""
    if asked.accept is not None and asked.accept not in RENDERED_TYPES:
        raise HTTPException(400, f"accept is one of {', '.join(RENDERED_TYPES)}")
    try:
        parse_quality(asked.quality), parse_viewport(asked.viewport), parse_window(asked.window)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None
    given = {
        "accept": asked.accept,
        "viewport": asked.viewport,
        "window": asked.window,
        "quality": asked.quality,
    }
    return {name: value for name, value in given.items() if value is not None}
