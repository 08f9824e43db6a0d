"""Rendered resources and thumbnails of WADO-RS (PS3.18 10.4.1.1.3, 10.4.1.1.5: `.../rendered`,
`.../thumbnail` on a study, series, instance or frames), for web viewers, EHR image links and reporting tools
that show a JPEG, PNG or GIF instead of decoding DICOM, and video a browser plays: a video clip as an MP4
(remuxed, video.py) or a WebM (VP9, re-encoded: webm.py), a cine stored as frames as a WebM.
Same key, case scope, audit and image rate bucket as the frames they are drawn from (the routes live on
`dicomweb.router`); a HEAD renders nothing.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse

from services.auth.routing import AuthRoute
from services.common.http import is_head
from services.records.api import SessionDep, SettingsDep
from services.records.dicomweb import CaseId, Uid, _retrievable, media_ranges
from services.records.rendering import (
    GIF,
    JPEG,
    NO_TEXT_FREE_BOX,
    RENDERED_TYPES,
    NotRendered,
    Rendering,
    RenderLimits,
    Source,
    Viewport,
    check_frames,
    check_viewport,
    get_render_limits,
    parse_quality,
    parse_viewport,
    parse_window,
    refuse_annotation,
    render,
    source,
    text_free_box,
)
from services.records.store import ObjectStore
from services.records.video import MP4, VIDEO_RENDERED_TYPES, WEBM, Clip, cached, clip, mp4
from services.records.webm import MPEG2_SYNTAXES, check_cine, check_clip, webm_of_cine, webm_of_clip

router: APIRouter = APIRouter(route_class=AuthRoute)
RenderLimitsDep = Annotated[RenderLimits, Depends(get_render_limits)]
Frames = Annotated[str, Path(pattern=r"^[1-9][0-9]{0,5}(,[1-9][0-9]{0,5})*$")]

IMAGE = {"schema": {"type": "string", "format": "binary"}}
REFUSALS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "a rendering parameter that does not parse, or annotation (not supported): the detail"
    },
    404: {"description": "nothing released in this case has these UIDs, or the instance has no such frame"},
    406: {
        "description": "not rendered: a media type other than image/jpeg, image/png or image/gif (an "
        "instance: video/webm for a video clip or a cine stored as frames, video/mp4 for a video clip), an "
        "instance that is no image (a report), a video clip asked for as an image, a single image asked for as "
        "video, pixel data or a bitstream no decoder here reads"
    },
    413: {
        "description": "a frame, a viewport, an animation or a video to encode over the rendering limits "
        "(RECORDS_RENDER_*)"
    },
}
RENDERED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the image rendered (PS3.18 8.7.4): JPEG by default; a multi-frame instance as image/gif "
        "is animated with its frame timing, as image/jpeg or image/png it is its first frame",
        "content": {JPEG: IMAGE, "image/png": IMAGE, GIF: IMAGE},
    },
    **REFUSALS,
}
INSTANCE_RENDERED: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the image rendered (PS3.18 8.7.4): JPEG by default; a multi-frame instance as image/gif "
        "is animated with its frame timing, as image/jpeg or image/png it is its first frame, as video/webm "
        "(asked for: video/webm or video/*) each frame rendered as .../frames/{n}/rendered renders it, encoded "
        "as VP9 with its frame timing. A video clip is video/mp4 (its bitstream remuxed, not re-encoded, index "
        "first: the default for H.264 and HEVC) or video/webm (decoded and re-encoded as VP9: the default for "
        "MPEG-2, which no browser plays from an MP4)",
        "content": {JPEG: IMAGE, "image/png": IMAGE, GIF: IMAGE, MP4: IMAGE, WEBM: IMAGE},
    },
    206: {
        "description": "a video's byte range (the Range header), as a <video> element seeks",
        "content": {MP4: IMAGE, WEBM: IMAGE},
    },
    416: {"description": "a Range past the end of the video"},
    503: {
        "description": "no room in the video cache to render the video now (RECORDS_RENDER_VIDEO_CACHE_DIR), "
        "or every video encoder busy (RECORDS_RENDER_VIDEO_ENCODES): Retry-After says when to ask again"
    },
    **REFUSALS,
}
RENDERED_SET: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "each instance of it that renders as an image, one part each (PS3.18 10.4.1.1.3), its "
        "first frame (image/gif: all, animated); a Warning header counts those left out (reports, videos)",
        "content": {"multipart/related": IMAGE},
    },
    **REFUSALS,
}
THUMBNAIL: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "a small image of a representative frame (PS3.18 10.4.3.3.4): the first frame of the "
        "first instance that renders, within 128x128 unless a viewport says otherwise; an ultrasound frame "
        "that may carry burned-in text is cut to its ultrasound regions",
        "content": {JPEG: IMAGE, "image/png": IMAGE, GIF: IMAGE},
    },
    **REFUSALS,
}


def rendered_type(request: Request, multipart: bool = False, cine: bool = False) -> str:
    """The Rendered Media Type asked for: the `accept` query parameter or the Accept header, its media ranges
    by q, then order (PS3.18 8.3.3.1, 8.7.5); `*/*` and `image/*` are JPEG. A study or series may be asked
    for as `multipart/related; type="image/png"` too; an instance (`cine`) as video/webm (or video/*). No
    range fits: 406, naming those served (a request for video/mp4 is told that a cine stored as frames plays
    as video/webm or animates as image/gif: only a video clip is remuxed into an MP4)."""
    ranges = media_ranges(request.query_params.get("accept") or request.headers.get("accept"))
    for kind, params in ranges:
        if multipart and kind in ("multipart/related", "multipart/*"):
            kind = params.get("type", JPEG).lower()
        if kind in ("*/*", "image/*"):
            return JPEG
        if kind in RENDERED_TYPES:
            return kind
        if cine and kind in (WEBM, "video/*"):
            return WEBM
    raise HTTPException(
        406,
        f"rendered images are served as {', '.join(RENDERED_TYPES)}"
        + (" (in multipart/related for a study or series)" if multipart else "")
        + "; see the Accept header"
        + (
            "; video/mp4 is served for video clips (MPEG-2, H.264, HEVC) only; a cine stored as frames plays as "
            "video/webm (VP9: .../instances/{uid}/rendered with Accept: video/webm) or animates as image/gif"
            if any(kind.startswith("video/") for kind, _ in ranges)
            else ""
        ),
    )


def video_type(request: Request, found: Clip) -> str:
    """The media type a video clip is rendered as, from the `accept` query parameter or the Accept header:
    video/mp4 or video/webm as asked; for `*/*` and `video/*` WebM for MPEG-2 (no browser plays MPEG-2 from an
    MP4) and MP4 for H.264 and HEVC (remuxed: the stored pictures, little CPU). Else a 406 saying what the clip
    renders as."""
    default = WEBM if found.syntax in MPEG2_SYNTAXES else MP4
    for kind, _ in media_ranges(request.query_params.get("accept") or request.headers.get("accept")):
        if kind in ("*/*", "video/*"):
            return default
        if kind in VIDEO_RENDERED_TYPES:
            return kind
    raise HTTPException(
        406,
        "this instance is a video clip: it renders as video/mp4 (its bitstream remuxed) or video/webm (VP9, "
        "re-encoded), not as an image; ask with Accept: video/webm or video/mp4, or retrieve its bitstream as "
        "stored from .../frames/1",
    )


def video_answer(
    request: Request, found: Clip, kind: str, limits: RenderLimits, refused: dict[str, str | None]
) -> Response:
    """The clip as an MP4 (remuxed) or a WebM (re-encoded) file. Parameters that change a picture (a
    viewport, a window) are a 400: a clip is rendered whole, at its own size."""
    _refuse_image_parameters(refused)
    if kind == MP4:
        return _video_file(request, found.cache_key, MP4, limits, lambda: mp4(found, limits))
    try:
        check_clip(found, limits)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail, headers=exc.headers) from None
    return _video_file(request, found.cache_key, WEBM, limits, lambda: webm_of_clip(found, limits))


def cine_answer(
    request: Request, src: Source, cache_key: str, limits: RenderLimits, refused: dict[str, str | None]
) -> Response:
    """A cine stored as frames as a WebM, its frames rendered as `.../frames/{n}/rendered` renders them."""
    _refuse_image_parameters(refused)
    try:
        check_cine(src, limits)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail, headers=exc.headers) from None
    return _video_file(request, cache_key, WEBM, limits, lambda: webm_of_cine(src, cache_key, limits))


def _refuse_image_parameters(refused: dict[str, str | None]) -> None:
    given = [name for name, value in refused.items() if value is not None]
    if given:
        raise HTTPException(
            400,
            f"{', '.join(given)} apply to images; video is rendered whole, at its stored size and with its "
            f"own VOI: leave {'it' if len(given) == 1 else 'them'} out",
        )


def _video_file(
    request: Request, cache_key: str, kind: str, limits: RenderLimits, make: Callable[[], FilePath]
) -> Response:
    """The video file with Range support (Starlette's FileResponse: 206 for one range, 416 past the end). A
    HEAD makes nothing (the length is known once the video has been made and cached)."""
    try:
        if is_head(request):
            ready = cached(cache_key, kind, limits)
            if ready is None:
                response = Response(media_type=kind, headers={"Accept-Ranges": "bytes"})
                del response.headers["content-length"]  # not known before the video is made
                return response
            return FileResponse(ready, media_type=kind)
        return FileResponse(make(), media_type=kind)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail, headers=exc.headers) from None


def _rendering(
    request: Request,
    *,
    multipart: bool = False,
    cine: bool = False,
    quality: str | None = None,
    viewport: str | None = None,
    window: str | None = None,
    annotation: str | None = None,
) -> Rendering:
    media_type = rendered_type(request, multipart, cine)
    try:
        refuse_annotation(annotation)
        return Rendering(
            media_type=media_type,
            quality=parse_quality(quality),
            viewport=parse_viewport(viewport),
            window=parse_window(window),
        )
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None


def _answer(
    src: Source, numbers: list[int], rendering: Rendering, limits: RenderLimits, request: Request
) -> Response:
    try:
        check_frames(src, numbers)
        check_viewport(rendering.viewport, limits)
        if is_head(request):  # the headers alone: nothing decoded
            return Response(media_type=rendering.media_type)
        return Response(render(src, numbers, rendering, limits), media_type=rendering.media_type)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None


def _source(path: Any, limits: RenderLimits) -> Source:
    try:
        return source(path, limits)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None


Quality = Annotated[str | None, Query(description="JPEG quality, 1 to 100 (PS3.18 8.3.5.1.2)")]
ViewportQ = Annotated[
    str | None, Query(description="vw,vh[,sx,sy,sw,sh]: fit the source region into vw x vh (8.3.5.1.3)")
]
WindowQ = Annotated[
    str | None,
    Query(
        description="center,width[,linear|linear-exact|sigmoid]: the VOI window (8.3.5.1.4); default the instance's"
    ),
]
Annotation = Annotated[str | None, Query(description="not supported (a 400): no text is burned in")]
Charset = Annotated[str | None, Query(description="accepted and ignored: images carry no text")]


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/rendered",
    response_class=Response,
    responses=INSTANCE_RENDERED,
)
def retrieve_instance_rendered(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    sop: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    window: WindowQ = None,
    annotation: Annotation = None,
    charset: Charset = None,
) -> Response:
    """An image as JPEG (the default), PNG or GIF (a multi-frame one animated), a cine stored as frames as
    video/webm too; a video clip as video/mp4 or video/webm."""
    try:  # every parameter checked before anything is looked up
        refuse_annotation(annotation)
        parse_quality(quality), parse_viewport(viewport), parse_window(window)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None
    files, _ = _retrievable(session, case_id, study, series, sop)
    row = files[-1]
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    found = clip(path, row.sha256)
    if found is not None:
        return video_answer(
            request, found, video_type(request, found), limits, {"viewport": viewport, "window": window}
        )
    rendering = _rendering(
        request, cine=True, quality=quality, viewport=viewport, window=window, annotation=annotation
    )
    src = _source(path, limits)
    if rendering.media_type == WEBM:
        return cine_answer(request, src, row.sha256, limits, {"viewport": viewport, "window": window})
    numbers = list(range(1, src.frames + 1)) if rendering.media_type == GIF else [1]
    return _answer(src, numbers, rendering, limits, request)


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/rendered",
    response_class=Response,
    responses=RENDERED,
)
def retrieve_frames_rendered(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    sop: Uid,
    frames: Frames,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    window: WindowQ = None,
    annotation: Annotation = None,
    charset: Charset = None,
) -> Response:
    """One frame as JPEG, PNG or GIF; several as an animated GIF (in the order asked for)."""
    rendering = _rendering(request, quality=quality, viewport=viewport, window=window, annotation=annotation)
    src = _instance_source(session, settings, limits, case_id, study, series, sop)
    return _answer(src, [int(n) for n in frames.split(",")], rendering, limits, request)


def _instance_source(
    session: Any,
    settings: Any,
    limits: RenderLimits,
    case_id: str,
    study: str,
    series: str | None,
    sop: str | None,
) -> Source:
    files, _ = _retrievable(session, case_id, study, series, sop)
    row = files[-1]
    return _source(ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256), limits)


@router.get(
    "/cases/{case_id}/studies/{study}/rendered", response_class=StreamingResponse, responses=RENDERED_SET
)
def retrieve_study_rendered(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    window: WindowQ = None,
    annotation: Annotation = None,
    charset: Charset = None,
) -> StreamingResponse:
    rendering = _rendering(
        request, multipart=True, quality=quality, viewport=viewport, window=window, annotation=annotation
    )
    return _set_rendered(request, session, settings, limits, rendering, case_id, study, None)


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/rendered",
    response_class=StreamingResponse,
    responses=RENDERED_SET,
)
def retrieve_series_rendered(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    window: WindowQ = None,
    annotation: Annotation = None,
    charset: Charset = None,
) -> StreamingResponse:
    rendering = _rendering(
        request, multipart=True, quality=quality, viewport=viewport, window=window, annotation=annotation
    )
    return _set_rendered(request, session, settings, limits, rendering, case_id, study, series)


def _set_rendered(
    request: Request,
    session: Any,
    settings: Any,
    limits: RenderLimits,
    rendering: Rendering,
    case_id: str,
    study: str,
    series: str | None,
) -> StreamingResponse:
    """Each instance rendered, one part each, rendered as the part is sent (one instance in memory at a time)."""
    try:
        check_viewport(rendering.viewport, limits)
    except NotRendered as exc:
        raise HTTPException(exc.status, exc.detail) from None
    files, _ = _retrievable(session, case_id, study, series, None)
    store = ObjectStore.for_settings(settings)
    sources, reasons = [], []
    for row in files:
        try:
            sources.append(source(store.local_path(row.storage_path, row.sha256), limits))
        except NotRendered as exc:
            reasons.append(exc.detail)
    if not sources:
        raise HTTPException(406, f"no instance here renders as an image: {reasons[0]}")
    boundary = uuid.uuid4().hex
    headers = {}
    if reasons:
        base = f"{settings.records_url}/dicomweb/cases/{case_id}"
        headers["Warning"] = (
            f'299 {base} "{len(reasons)} instance(s) not rendered (reports, video clips or pixel data not '
            'decoded here): retrieve them as application/dicom"'
        )

    def body() -> Iterator[bytes]:
        for src in sources:
            numbers = list(range(1, src.frames + 1)) if rendering.media_type == GIF else [1]
            try:
                image = render(src, numbers, rendering, limits)
            except NotRendered:
                continue  # found only while decoding (a damaged frame): the others are still sent
            yield f"--{boundary}\r\nContent-Type: {rendering.media_type}\r\n\r\n".encode()
            yield image
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        iter(()) if is_head(request) else body(),
        media_type=f'multipart/related; type="{rendering.media_type}"; boundary={boundary}',
        headers=headers,
    )


@router.get("/cases/{case_id}/studies/{study}/thumbnail", response_class=Response, responses=THUMBNAIL)
def retrieve_study_thumbnail(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    charset: Charset = None,
) -> Response:
    return _thumbnail(request, session, settings, limits, quality, viewport, case_id, study)


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/thumbnail", response_class=Response, responses=THUMBNAIL
)
def retrieve_series_thumbnail(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    charset: Charset = None,
) -> Response:
    return _thumbnail(request, session, settings, limits, quality, viewport, case_id, study, series)


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/thumbnail",
    response_class=Response,
    responses=THUMBNAIL,
)
def retrieve_instance_thumbnail(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    sop: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    charset: Charset = None,
) -> Response:
    return _thumbnail(request, session, settings, limits, quality, viewport, case_id, study, series, sop)


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/frames/{frames}/thumbnail",
    response_class=Response,
    responses=THUMBNAIL,
)
def retrieve_frames_thumbnail(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    sop: Uid,
    frames: Frames,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: RenderLimitsDep,
    quality: Quality = None,
    viewport: ViewportQ = None,
    charset: Charset = None,
) -> Response:
    number = int(frames.split(",")[0])
    return _thumbnail(
        request, session, settings, limits, quality, viewport, case_id, study, series, sop, number
    )


def _thumbnail(
    request: Request,
    session: Any,
    settings: Any,
    limits: RenderLimits,
    quality: str | None,
    viewport: str | None,
    case_id: str,
    study: str,
    series: str | None = None,
    sop: str | None = None,
    frame: int = 1,
) -> Response:
    """The frame asked for (else the first) of the first instance that renders as an image, fit into
    RECORDS_RENDER_THUMBNAIL_SIZE (128) square unless a viewport is given."""
    asked = _rendering(request, quality=quality, viewport=viewport)
    size = limits.thumbnail_size
    rendering = Rendering(
        media_type=asked.media_type,
        quality=asked.quality,
        viewport=asked.viewport or Viewport(size, size),
        crop_to_regions=True,
    )
    files, _ = _retrievable(session, case_id, study, series, sop)
    store = ObjectStore.for_settings(settings)
    reasons = []
    for row in files:
        try:
            src = source(store.local_path(row.storage_path, row.sha256), limits)
            if text_free_box(src.header) is None:
                raise NotRendered(406, NO_TEXT_FREE_BOX)
        except NotRendered as exc:
            if sop:
                raise HTTPException(exc.status, exc.detail) from None
            reasons.append(exc.detail)
            continue
        return _answer(src, [frame], rendering, limits, request)
    raise HTTPException(406, f"no instance here renders as an image: {reasons[0]}")
