"""WADO-URI (PS3.18 9.1-9.5): `GET /dicomweb/wado?requestType=WADO&studyUID=…&seriesUID=…&objectUID=…`, the
links EHRs, reporting tools and IHE XDS-I manifests carry. One instance, as application/dicom (as WADO-RS hands
it out: our identifiers; `anonymize=yes`: de-identified as the export is) or rendered as image/jpeg, image/png
or image/gif; a video clip as video/mp4 (its bitstream remuxed, video.py) or video/webm (re-encoded as VP9,
webm.py), a cine stored as frames as video/webm.

The URL names no case: the instance is looked up among the released images of the cases the key may see (the
same scope, audit entry per read window and image rate bucket as WADO-RS). Held in two such cases, it is a 409
naming the case-scoped WADO-RS URL to use instead.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import pydicom.uid
from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi.responses import StreamingResponse
from sqlmodel import col, select

from services.auth import AuthEngine, Caller, tenancy
from services.auth.access import check_case
from services.auth.routing import AuthRoute
from services.common.http import is_head
from services.records.api import SessionDep, SettingsDep
from services.records.deidentify import (
    UidMap,
    Withheld,
    deidentified_chunks,
    deidentified_header,
    may_export,
    pixel_cleaning,
)
from services.records.dicomweb import _identifiers, _modified_at, _served_syntax
from services.records.models import RecordFile
from services.records.reconcile import coerced_chunks
from services.records.rendered import RenderLimitsDep, _answer, _source, cine_answer, video_answer
from services.records.rendering import (
    GIF,
    RENDERED_TYPES,
    NotRendered,
    Rendering,
    Viewport,
    parse_quality,
    refuse_annotation,
    source,
    window,
)
from services.records.store import ObjectStore
from services.records.video import MP4, WEBM, clip

router: APIRouter = APIRouter(route_class=AuthRoute)

DICOM = "application/dicom"
UID = re.compile(r"[0-9]+(\.[0-9]+)*")
NUMBER = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)")
IMAGE = {"schema": {"type": "string", "format": "binary"}}
# Parameters that only an image takes (PS3.18 9.5.1.2): asked for with application/dicom they are a 400.
RENDERING_ONLY = ("annotation", "rows", "columns", "region", "windowCenter", "windowWidth", "frameNumber",
                  "imageQuality", "presentationUID", "presentationSeriesUID")  # fmt: skip

WADO_URI: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the instance: application/dicom (our identifiers; anonymize=yes: de-identified), or "
        "rendered as image/jpeg (the default for an image), image/png or image/gif (a multi-frame instance "
        "without frameNumber: animated); a video clip as video/mp4 (contentType=video/mp4: its bitstream "
        "remuxed, not re-encoded) or video/webm (re-encoded as VP9); a cine stored as frames as video/webm "
        "(each frame rendered, encoded as VP9); Range requests answered",
        "content": {DICOM: IMAGE, **{kind: IMAGE for kind in (*RENDERED_TYPES, MP4, WEBM)}},
    },
    206: {"description": "a video's byte range (the Range header)", "content": {MP4: IMAGE, WEBM: IMAGE}},
    400: {
        "description": "requestType is not WADO, a UID is missing or malformed, or a parameter does not fit"
    },
    404: {"description": "no released instance of a case visible to this key has these UIDs"},
    406: {
        "description": "contentType or Accept asks for something not served; a transferSyntax other than the "
        "stored one (no transcoding); an instance that does not render as an image (a report, a video clip, "
        "pixel data in a syntax no decoder here reads), video/mp4 for one that is no video clip (a cine stored "
        "as frames: video/webm or image/gif), video/webm for a single image"
    },
    409: {
        "description": "the instance is in more than one case this key may see (use the case's WADO-RS URL), "
        "or anonymize=yes for an instance whose burned-in text cannot be removed"
    },
    413: {
        "description": "a frame, an answer or a video to encode over the rendering limits (RECORDS_RENDER_*)"
    },
    503: {
        "description": "no room in the video cache to render the video now (RECORDS_RENDER_VIDEO_CACHE_DIR), "
        "or every video encoder busy (RECORDS_RENDER_VIDEO_ENCODES): Retry-After says when to ask again"
    },
}


def _text(description: str) -> Any:
    return Query(description=description)


@router.get("/wado", response_class=Response, responses=WADO_URI)
def wado_uri(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    caller: Caller,
    engine: AuthEngine,
    requestType: Annotated[str | None, _text("WADO")] = None,  # noqa: N803 - PS3.18 names the parameters
    studyUID: Annotated[str | None, _text("Study Instance UID")] = None,  # noqa: N803
    seriesUID: Annotated[str | None, _text("Series Instance UID")] = None,  # noqa: N803
    objectUID: Annotated[str | None, _text("SOP Instance UID")] = None,  # noqa: N803
    contentType: Annotated[
        str | None, _text("application/dicom, image/jpeg, image/png, image/gif, video/mp4 or video/webm")
    ] = None,  # noqa: N803
    charset: Annotated[str | None, _text("accepted and ignored")] = None,
    anonymize: Annotated[str | None, _text("yes: de-identified (application/dicom only)")] = None,
    annotation: Annotated[str | None, _text("not supported (a 400)")] = None,
    rows: Annotated[str | None, _text("the image's height at most, in pixels")] = None,
    columns: Annotated[str | None, _text("the image's width at most, in pixels")] = None,
    region: Annotated[str | None, _text("x1,y1,x2,y2: the part of the image, each 0.0 to 1.0")] = None,
    windowCenter: Annotated[str | None, _text("with windowWidth: the VOI window (linear)")] = None,  # noqa: N803
    windowWidth: Annotated[str | None, _text("with windowCenter")] = None,  # noqa: N803
    frameNumber: Annotated[str | None, _text("the frame (from 1) of a multi-frame instance")] = None,  # noqa: N803
    imageQuality: Annotated[str | None, _text("JPEG quality, 1 to 100")] = None,  # noqa: N803
    presentationUID: Annotated[str | None, _text("not supported (a 400)")] = None,  # noqa: N803
    presentationSeriesUID: Annotated[str | None, _text("not supported (a 400)")] = None,  # noqa: N803
    transferSyntax: Annotated[str | None, _text("application/dicom: the stored one only")] = None,  # noqa: N803
) -> Response:
    if requestType != "WADO":
        raise HTTPException(400, "requestType=WADO is required (PS3.18 9.1): this is the WADO-URI service")
    study, series, sop = (
        _uid("studyUID", studyUID), _uid("seriesUID", seriesUID), _uid("objectUID", objectUID)
    )  # fmt: skip
    media_type = _content_type(request, contentType)
    if presentationUID or presentationSeriesUID:
        raise HTTPException(400, "presentation states are not applied here: leave presentationUID out")
    if media_type == DICOM:
        given = [n for n in RENDERING_ONLY if request.query_params.get(n) is not None]
        if given:
            raise HTTPException(
                400, f"{', '.join(given)} apply to images, not to contentType=application/dicom"
            )
        if anonymize not in (None, "yes"):
            raise HTTPException(400, "anonymize takes one value, yes (PS3.18 9.4.1.2)")
    elif anonymize is not None:
        raise HTTPException(400, "anonymize applies to contentType=application/dicom only")
    try:  # every parameter checked before anything is looked up
        refuse_annotation(annotation)
        quality, windowed, fraction = (
            parse_quality(imageQuality),
            _window(windowCenter, windowWidth),
            _region(region),
        )
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None
    _check_size(rows, columns)

    case_id, row = _visible_instance(session, caller, engine, study, series, sop)
    check_case(
        request, engine, caller, case_id, "records.dicomweb", specialists=True, dicom=True,
        uids={"study": study, "series": series, "sop": sop},
    )  # fmt: skip
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    if media_type is None:  # no contentType: JPEG for an image, the instance itself otherwise (PS3.18 9.5)
        try:
            source(path, limits)
            media_type = "image/jpeg"
        except NotRendered:
            media_type = DICOM
    if media_type == DICOM:
        return _instance(request, session, row, path, case_id, anonymize == "yes", transferSyntax)
    if media_type in (MP4, WEBM):
        refused = {name: request.query_params.get(name) for name in RENDERING_ONLY if name != "imageQuality"}
        found = clip(path, row.sha256)
        if found is not None:
            return video_answer(request, found, media_type, limits, refused)
        if media_type == MP4:
            raise HTTPException(
                406,
                "video/mp4 is served for video clips (MPEG-2, H.264, HEVC) only; this instance renders as an "
                "image: image/jpeg, image/png or image/gif, and a cine stored as frames plays as video/webm "
                "(contentType=video/webm) or animates as image/gif",
            )
        return cine_answer(request, _source(path, limits), row.sha256, limits, refused)

    src = _source(path, limits)
    rendering = Rendering(
        media_type=media_type,
        quality=quality,
        window=windowed,
        fraction=fraction,
        viewport=_size(rows, columns, src.header),
    )
    if frameNumber is not None:
        if "NumberOfFrames" not in src.header:  # PS3.18 9.5.2.1
            raise HTTPException(
                400, "frameNumber applies to a multi-frame instance; this one is a single image"
            )
        if not re.fullmatch(r"[0-9]{1,6}", frameNumber) or not 1 <= int(frameNumber) <= src.frames:
            raise HTTPException(400, f"frameNumber is a frame of this instance: 1 to {src.frames}")
        numbers = [int(frameNumber)]
    else:
        numbers = list(range(1, src.frames + 1)) if media_type == GIF else [1]
    return _answer(src, numbers, rendering, limits, request)


def _content_type(request: Request, asked: str | None) -> str | None:
    """The first media type of contentType (a list, PS3.18 9.1.2.2) served and allowed by Accept; None when
    contentType is absent (decided by the instance)."""
    accept = [r.split(";")[0].strip().lower() for r in (request.headers.get("accept") or "*/*").split(",")]

    def accepted(kind: str) -> bool:
        return any(r in ("*/*", kind, kind.split("/")[0] + "/*") for r in accept)

    if asked is None:
        return None if accepted("image/jpeg") or accepted(DICOM) else _refuse()
    for kind in (k.split(";")[0].strip().lower() for k in asked.split(",")):
        if kind in (DICOM, *RENDERED_TYPES, MP4, WEBM) and accepted(kind):
            return kind
    return _refuse()


def _refuse() -> str:
    raise HTTPException(
        406,
        f"WADO-URI serves contentType {DICOM}, {', '.join(RENDERED_TYPES)}, {MP4} (video clips), {WEBM} (video "
        "clips and cines stored as frames); the Accept header must allow it",
    )


def _uid(name: str, value: str | None) -> str:
    if not value or len(value) > 64 or not UID.fullmatch(value):
        raise HTTPException(400, f"{name} is required and is a UID (digits and dots, at most 64 characters)")
    return value


def _visible_instance(
    session: Any, caller: Any, engine: Any, study: str, series: str, sop: str
) -> tuple[str, RecordFile]:
    rows = session.exec(
        select(RecordFile)
        .where(
            RecordFile.sop_instance_uid == sop,
            RecordFile.series_instance_uid == series,
            RecordFile.study_instance_uid == study,
            col(RecordFile.released).is_(True),
        )
        .order_by(col(RecordFile.id))
    ).all()
    by_case: dict[str, RecordFile] = {}
    for row in rows:
        by_case[row.case_id] = row  # the last stored, as WADO-RS hands out
    visible = {
        case_id: row
        for case_id, row in by_case.items()
        if tenancy.may_see_case(engine, caller.role, caller.partner_id, caller.specialist_id, case_id)
    }
    if not visible:
        raise HTTPException(404, "no released instance of a case visible to your key has these UIDs")
    if len(visible) > 1:
        raise HTTPException(
            409,
            "this instance is held in more than one case your key may see: retrieve it from the case's own "
            "WADO-RS URL, /dicomweb/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}",
        )
    return next(iter(visible.items()))


def _instance(
    request: Request,
    session: Any,
    row: RecordFile,
    path: Any,
    case_id: str,
    anonymize: bool,
    syntax: str | None,
) -> Response:
    if not anonymize and syntax is not None and syntax != _served_syntax(path):
        raise HTTPException(406, "no transcoding here: leave transferSyntax out, or give the stored one")
    if not anonymize:
        ids = _identifiers(session, case_id)
        chunks = iter(()) if is_head(request) else coerced_chunks(path, ids, _modified_at(session, row))
        return StreamingResponse(chunks, media_type=DICOM)
    uids = UidMap()
    header, pixel_length = deidentified_header(path, uids)
    cleaning = None
    if not may_export(row.burned_in_annotation):
        found = pixel_cleaning(header, pixel_length, path)
        if isinstance(found, Withheld):
            raise HTTPException(
                409, f"not handed out de-identified: {found.reason}; retrieve it without anonymize"
            )
        cleaning = found
    # Compressed pixels are decoded to be cleaned: they go out native, in no other syntax.
    served = pydicom.uid.ExplicitVRLittleEndian if cleaning and cleaning.decodes else _served_syntax(path)
    if syntax is not None and syntax != served:
        raise HTTPException(
            406,
            f"anonymized, this instance goes out as {served} only: leave transferSyntax out, or give that one",
        )
    body = iter(()) if is_head(request) else deidentified_chunks(path, uids, cleaning)
    return StreamingResponse(body, media_type=DICOM)


def _window(center: str | None, width: str | None) -> Any:
    if center is None and width is None:
        return None
    if center is None or width is None or not NUMBER.fullmatch(center) or not NUMBER.fullmatch(width):
        raise NotRendered(400, "windowCenter and windowWidth come together, each a number")
    return window(float(center), float(width), "linear")


def _region(value: str | None) -> tuple[float, float, float, float] | None:
    if value is None:
        return None
    parts = value.split(",")
    if len(parts) != 4 or not all(NUMBER.fullmatch(p.strip()) for p in parts):
        raise NotRendered(400, "region is x1,y1,x2,y2, each from 0.0 to 1.0, e.g. region=0.25,0.25,0.75,0.75")
    x1, y1, x2, y2 = (float(p) for p in parts)
    if not (0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1):
        raise NotRendered(400, "region is x1,y1,x2,y2 with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1")
    return (x1, y1, x2, y2)


def _check_size(rows: str | None, columns: str | None) -> None:
    for name, value in (("rows", rows), ("columns", columns)):
        if value is not None and (not re.fullmatch(r"[0-9]{1,5}", value) or int(value) < 1):
            raise HTTPException(400, f"{name} is a whole number of pixels above 0")


def _size(rows: str | None, columns: str | None, header: Any) -> Viewport | None:
    """rows and columns bound the image's size, its aspect ratio kept (PS3.18 9.5.1.2.2)."""
    if rows is None and columns is None:
        return None
    height, width = int(header.Rows), int(header.Columns)
    h = int(rows) if rows else max(1, round(int(columns or 1) * height / width))
    w = int(columns) if columns else max(1, round(int(rows or 1) * width / height))
    return Viewport(w, h)
