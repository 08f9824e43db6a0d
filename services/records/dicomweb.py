"""DICOMweb on `/dicomweb/`: STOW-RS into the same validated, reconciled import path as uploads, and
QIDO-RS / WADO-RS over what was imported and released, scoped to one case.

Base URL of a case: `/dicomweb/cases/{case_id}` (give it to a DICOMweb client or a viewer as its root).
`POST /dicomweb/studies` also accepts a study for the open request whose exam names its Study Instance UID
or Accession Number.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any

import pydicom
import pydicom.datadict
import pydicom.encaps
import pydicom.tag
import pydicom.uid
import structlog
from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import JSONResponse, StreamingResponse
from python_multipart.multipart import parse_options_header
from sqlmodel import Session, col, or_, select
from starlette.concurrency import run_in_threadpool

from services.auth import AuthEngine, Caller, tenancy
from services.auth.access import case_scope, check_case
from services.auth.problems import AUTH_ERRORS
from services.auth.routing import AuthRoute
from services.common.config import Settings
from services.common.http import is_head
from services.records import stow, uploads
from services.records.api import SessionDep, SettingsDep, notify_outbox
from services.records.archive import Entry
from services.records.archive_store import ArchiveUnavailable
from services.records.classify import header_or_none
from services.records.limits import ImportLimits, get_limits
from services.records.models import RecordFile, RecordImport, RecordRequest
from services.records.multipart_related import (
    BodyTooLarge,
    MalformedBody,
    OversizedPart,
    PartNotDicom,
    TooManyParts,
    UnsupportedMediaType,
    receive_parts,
)
from services.records.qido_matching import Matching, matching
from services.records.reconcile import ISSUER_DETAILS, coerced_chunks, coerced_header, our_identifiers
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)

# Every route needs a key and is scoped to the case like /v1/records (STOW: the partner and operations).
router: APIRouter = APIRouter(
    prefix="/dicomweb",
    tags=["dicomweb"],
    dependencies=[Depends(case_scope("records.dicomweb", specialists=True, dicom=True))],
    responses={
        **AUTH_ERRORS,
        406: {
            "description": "the Accept header asks for a media type this resource is not served as; the detail names those it is"
        },
    },
    route_class=AuthRoute,
)

DICOM_JSON = "application/dicom+json"


class DicomJsonResponse(JSONResponse):
    """What QIDO-RS and the metadata answer (the document said application/json)."""

    media_type = DICOM_JSON


# PS3.18 F.2: an array of datasets, each an object keyed by tag, e.g. {"0020000D": {"vr": "UI", "Value": [...]}}.
DICOM_DATASETS: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "additionalProperties": {
            "type": "object",
            "properties": {
                "vr": {"type": "string"},
                "Value": {"type": "array", "items": {}},
                "BulkDataURI": {"type": "string"},
            },
            "required": ["vr"],
        },
    },
}
DICOM_JSON_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "DICOM JSON (PS3.18 F.2): one dataset per match",
        "content": {DICOM_JSON: {"schema": DICOM_DATASETS}},
    }
}
MULTIPART = "multipart/related"
BINARY = {"schema": {"type": "string", "format": "binary"}}
INSTANCES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the instances, one application/dicom part each (PS3.18 8.7.1)",
        "content": {MULTIPART: BINARY},
    }
}
QIDO_ANSWER: dict[int | str, dict[str, Any]] = {
    **DICOM_JSON_ANSWER,
    400: {
        "description": "a query key's value does not fit its VR (SeriesNumber=two): the detail names the key"
    },
}
Uid = Annotated[str, Path(pattern=r"^[0-9.]{1,64}$")]
CaseId = Annotated[str, Path(min_length=1, max_length=64)]
LimitsDep = Annotated[ImportLimits, Depends(get_limits)]


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}


def _dicom_json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def media_ranges(header: str | None) -> list[tuple[str, dict[str, str]]]:
    """The media ranges of an Accept header (none: `*/*`), lower case with their parameters, most wanted first
    (by q, then as listed; q=0 ranges, which refuse a type, left out) (RFC 9110 12.5.1)."""
    ranges = []
    for index, media_range in enumerate((header or "*/*").split(",")):
        raw_kind, raw = parse_options_header(media_range.strip())
        params = {k.decode("latin-1").lower(): v.decode("latin-1").strip('"') for k, v in raw.items()}
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 1.0
        if quality > 0:
            ranges.append((-quality, index, raw_kind.decode("latin-1").lower(), params))
    return [(kind, params) for _, _, kind, params in sorted(ranges, key=lambda r: (r[0], r[1]))]


def _negotiate(
    request: Request, *offered: str, takes: Callable[[dict[str, str]], bool] | None = None, refusal: str = ""
) -> tuple[str, dict[str, str]]:
    """The offer and the parameters of the first Accept media range that one of `offered` satisfies (a
    multipart offer is "multipart/related;type=X") and, if given, `takes` accepts (its parameters, such as a
    transfer syntax, fit what is stored); 406 when none does (PS3.18 8.7.5, 8.7.8), saying `refusal` when a
    range of an offered type was turned down by `takes` alone. No Accept header accepts all."""
    turned_down = False
    for kind, params in media_ranges(request.headers.get("accept")):
        for offer in offered:
            main, _, part = offer.partition(";type=")
            asked = params.get("type", part).lower()
            if kind in ("*/*", "multipart/*") or (
                kind == main and (not part or asked in (part, "*/*", part.split("/")[0] + "/*"))
            ):
                if takes is None or takes(params):
                    return offer, params
                turned_down = True
    if turned_down and refusal:
        raise HTTPException(406, refusal)
    raise HTTPException(406, f"this resource is available as {' or '.join(offered)}; see the Accept header")


# --- STOW-RS -------------------------------------------------------------------------------------

_MODULE = "Store Instances Response Module (PS3.18 Annex I) as application/dicom+json"
STORE_RESPONSE = {DICOM_JSON: {"schema": DICOM_DATASETS["items"]}}  # one dataset: the Response Module
STOW_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": f"every instance stored; {_MODULE}", "content": STORE_RESPONSE},
    202: {
        "description": f"some stored, others failed or stored with a warning; {_MODULE}",
        "content": STORE_RESPONSE,
    },
    400: {"description": "a malformed multipart/related body; nothing stored"},
    409: {
        "description": f"no instance stored; {_MODULE} with each Failure Reason (an instance over the size "
        "limit: A700, Out of Resources)",
        "content": STORE_RESPONSE,
    },
    413: {"description": "more parts or more bytes than one request may hold; nothing stored"},
    415: {"description": 'not multipart/related; type="application/dicom"; nothing stored'},
}


@router.post("/cases/{case_id}/studies", response_class=DicomJsonResponse, responses=STOW_RESPONSES)
async def store_instances(
    case_id: CaseId, request: Request, session: SessionDep, settings: SettingsDep, limits: LimitsDep
) -> JSONResponse:
    return await _stow(request, session, settings, limits, case_id=case_id, study=None)


@router.post("/cases/{case_id}/studies/{study}", response_class=DicomJsonResponse, responses=STOW_RESPONSES)
async def store_study_instances(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: LimitsDep,
) -> JSONResponse:
    return await _stow(request, session, settings, limits, case_id=case_id, study=study)


@router.post("/studies", response_class=DicomJsonResponse, responses=STOW_RESPONSES)
async def store_instances_for_requested_study(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    limits: LimitsDep,
    caller: Caller,
    engine: AuthEngine,
) -> JSONResponse:
    def visible(case_id: str) -> bool:
        return tenancy.may_see_case(engine, caller.role, caller.partner_id, caller.specialist_id, case_id)

    def admit(case_id: str) -> None:
        check_case(request, engine, caller, case_id, "records.dicomweb", specialists=False)

    return await _stow(request, session, settings, limits, case_id=None, study=None, scope=(visible, admit))


async def _stow(
    request: Request,
    session: Session,
    settings: Settings,
    limits: ImportLimits,
    *,
    case_id: str | None,
    study: str | None,
    scope: tuple[Callable[[str], bool], Callable[[str], None]] | None = None,
) -> JSONResponse:
    store = ObjectStore.for_settings(settings)
    try:
        parts = await receive_parts(
            request.headers.get("content-type"),
            request.stream(),
            store,
            max_parts=limits.max_archive_members,
            limit=settings.max_upload_bytes,
            max_total=limits.max_archive_total_bytes,
        )
    except (UnsupportedMediaType, PartNotDicom) as exc:
        raise HTTPException(415, str(exc)) from None
    except MalformedBody as exc:
        raise HTTPException(400, str(exc)) from None
    except (TooManyParts, BodyTooLarge) as exc:
        raise HTTPException(413, str(exc)) from None
    try:
        return await run_in_threadpool(_stow_entries, parts, session, settings, limits, case_id, study, scope)
    finally:
        for part in parts:
            if isinstance(part, Entry):
                store.discard(part.received)


def _stow_entries(
    parts: list[Entry | OversizedPart],
    session: Session,
    settings: Settings,
    limits: ImportLimits,
    case_id: str | None,
    study: str | None,
    scope: tuple[Callable[[str], bool], Callable[[str], None]] | None = None,
) -> JSONResponse:
    """Each part stored or refused on its own (PS3.18 10.5.3); a refused part is never stored in part."""
    if case_id is None:
        visible, admit = scope or (lambda _: True, lambda _: None)
        case_id = _case_for([p for p in parts if isinstance(p, Entry)], session, visible)
        admit(case_id)
    closed = None
    try:
        uploads.check_open(session, case_id)
    except uploads.RecordsNotRequested as exc:
        raise HTTPException(404, str(exc)) from None
    except uploads.RecordsCancelled as exc:
        closed = str(exc)
    usable, refused = stow.sort_parts(parts, limits, uploads.header_reader(limits), study)
    outcome = None
    if usable and closed is None:
        try:
            outcome = uploads.store_classified(case_id, usable, session, settings, source="stow-rs")
        except uploads.RecordsNotRequested as exc:
            raise HTTPException(404, str(exc)) from None
        except uploads.RecordsCancelled as exc:
            closed = str(exc)
        except ArchiveUnavailable as exc:
            raise HTTPException(
                503, f"{exc}; nothing from this request was indexed, send it again later"
            ) from None
        else:
            notify_outbox()
    if closed is not None:
        refused += stow.refuse_all(usable, stow.FailureReason.PROCESSING_FAILURE, closed)
    exam = outcome.request.exam if outcome else _requested_exam(session, case_id)
    status, body = stow.response_module(
        f"{settings.records_url}/dicomweb/cases/{case_id}",
        usable,
        refused,
        outcome,
        our_identifiers(case_id, exam),
    )
    if refused:
        log.info(
            "records.stow_refused",
            case_id=case_id,
            stored=len(usable) if outcome else 0,
            refused=len(refused),
            reasons=sorted({f"{r.reason:#06x}" for r in refused}),
        )
    headers = {"Warning": stow.warning_fields(refused)} if refused else None
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _requested_exam(session: Session, case_id: str) -> dict[str, Any]:
    request = session.get(RecordRequest, case_id)
    exam = dict(request.exam) if request is not None else {}
    session.rollback()  # hold no transaction open
    return exam


def _case_for(entries: list[Entry], session: Session, visible: Callable[[str], bool]) -> str:
    headers = [h for e in entries if (h := header_or_none(e.received.path)) is not None]
    open_requests = session.exec(select(RecordRequest).where(col(RecordRequest.cancelled_at).is_(None))).all()
    matches = {
        r.case_id
        for r in open_requests
        for h in headers
        if (r.exam.get("study_instance_uid") and r.exam["study_instance_uid"] == h.study_instance_uid)
        or (r.exam.get("accession_number") and r.exam["accession_number"] == h.accession_number)
    }
    matches = {case_id for case_id in matches if visible(case_id)}  # other partners' cases stay unseen
    if len(matches) != 1:
        raise HTTPException(
            404 if not matches else 409,
            "no single open records request names this study's Study Instance UID or Accession Number; "
            "store it at /dicomweb/cases/{case_id}/studies instead",
        )
    return matches.pop()


# --- QIDO-RS -------------------------------------------------------------------------------------


def _value_list(value: str) -> list[str]:
    """The values of a list matching key: separated by commas (PS3.18 8.3.4.1) or by backslashes, DICOM's own
    value delimiter, which OHIF puts between the Study Instance UIDs of a viewer opened on several studies
    (neither can be part of a UID or a code string). A viewer opened that way found no study at all."""
    return [v for v in re.split(r"[,\\]", value) if v]


def _released(
    session: Session, case_id: str, empty: tuple[str, ...] = (), **where: str | None
) -> list[RecordFile]:
    """The released instances of the case, those of each `where` column among its value list, and of each
    `empty` column without a value (Empty Value Matching)."""
    query = select(RecordFile).where(
        RecordFile.case_id == case_id,
        col(RecordFile.released).is_(True),
        col(RecordFile.sop_instance_uid).is_not(None),
    )
    for column, value in where.items():
        if value:
            query = query.where(col(getattr(RecordFile, column)).in_(_value_list(value)))
    for column in empty:
        query = query.where(
            or_(col(getattr(RecordFile, column)).is_(None), col(getattr(RecordFile, column)) == "")
        )
    rows = session.exec(query.order_by(col(RecordFile.id))).all()
    # One instance per SOP Instance UID (the last stored): the same instance may arrive twice with other
    # bytes (a CD upload and a C-GET the PACS transcoded, a re-send with a corrected header).
    return list({row.sop_instance_uid: row for row in rows}.values())


def _identifiers(session: Session, case_id: str) -> dict[str, str]:
    request = session.get(RecordRequest, case_id)
    if request is None:
        raise HTTPException(404, "no records were requested for this case; check the case id")
    return our_identifiers(case_id, request.exam)


def _page(items: list[dict[str, Any]], limit: int | None, offset: int) -> list[dict[str, Any]]:
    return items[offset : offset + limit if limit else None]


# QIDO-RS parameters that are not matching keys (PS3.18 Table 8.3.4-1).
QIDO_PARAMETERS = {
    "limit",
    "offset",
    "includefield",
    "fuzzymatching",
    "emptyvaluematching",  # qido_matching.py
    "multiplevaluematching",
}
FUZZY_NOT_SUPPORTED = (
    "The fuzzymatching parameter is not supported. Only literal matching has been performed."
)
# What of a key's name a Warning may repeat: a keyword or a tag, never the value (it may be a patient's name).
NAMEABLE_KEY = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}|[0-9A-Fa-f]{8}")
MAX_NAMED_KEYS = 10


def _not_honoured(request: Request, settings: Settings, case_id: str) -> dict[str, str] | None:
    """The Warning header (RFC 7234 5.5, PS3.18 8.3.4.2) for each part of a query not honoured: a matching
    key this resource does not match on (ignored: universal matching) and `fuzzymatching=true` (literal
    matching only); None when all is. They were ignored silently, and a client took an unfiltered list for a
    match. A fuzzymatching that is neither true nor false is a 400."""
    fuzzy = request.query_params.get("fuzzymatching")
    if fuzzy is not None and fuzzy.lower() not in ("true", "false"):
        raise HTTPException(
            400, "fuzzymatching is true or false (PS3.18 8.3.4.2); the value given is neither"
        )
    route = request.scope.get("route")
    matched = {p.alias for p in route.dependant.query_params} if route is not None else set()
    # An empty value asks for universal matching, which ignoring the key gives.
    ignored = sorted(
        {k for k, v in request.query_params.multi_items() if v and k not in matched | QIDO_PARAMETERS}
    )
    service = f"{settings.records_url}/dicomweb/cases/{case_id}"
    warnings = []
    if fuzzy is not None and fuzzy.lower() == "true":
        warnings.append(f'299 {service} "{FUZZY_NOT_SUPPORTED}"')
    if ignored:
        named = [key for key in ignored if NAMEABLE_KEY.fullmatch(key)][:MAX_NAMED_KEYS]
        unnamed = len(ignored) - len(named)
        listed = ", ".join(named + ([f"{unnamed} other parameter(s)"] if unnamed else []))
        warnings.append(
            f'299 {service} "The following attributes are not supported as query keys and were ignored '
            f'(universal matching): {listed}"'
        )
    if not warnings:
        return None
    log.info("records.qido_not_honoured", case_id=case_id, fuzzy=bool(fuzzy), ignored_keys=len(ignored))
    return {"Warning": ", ".join(warnings)}


# Returned attributes PS3.18 Table 10.6.3-3 requires that the index does not keep, read from one header.
STUDY_KEYS = (
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyTime",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
)
SERIES_KEYS = ("SeriesNumber", "SeriesDescription")
# An instance query of a whole study returns its series' number too (PS3.18 Table 10.6.3-4).
INSTANCE_KEYS = ("InstanceNumber", "SeriesNumber", "Rows", "Columns", "BitsAllocated")
ONLINE = {"00080056": _attr("CS", "ONLINE")}
# What coercion replaces in every instance handed out (reconcile.py): a stored header's value is not ours.
COERCED = {
    "PatientID",
    "IssuerOfPatientID",
    "AccessionNumber",
    "OriginalAttributesSequence",
    *ISSUER_DETAILS.values(),
}
MAX_INCLUDED = 64
TAG_NAME = re.compile(r"[0-9A-Fa-f]{8}")


def _included(request: Request, keys: tuple[str, ...]) -> tuple[str, ...]:
    """`keys` and the attributes `includefield` asks for besides (PS3.18 8.3.4.3): keywords or tags, separated
    by commas, the parameter repeated or not. `all`, names outside the dictionary, File Meta and pixel data add
    nothing; what the route works out itself (counts, modalities, our identifiers) stands over a header's."""
    extra: list[str] = []
    for field in request.query_params.getlist("includefield"):
        for name in field.split(","):
            name = name.strip()
            keyword = pydicom.datadict.keyword_for_tag(int(name, 16)) if TAG_NAME.fullmatch(name) else name
            tag = pydicom.datadict.tag_for_keyword(keyword) if keyword else None
            if tag is None or tag >> 16 in (0x0002, 0x7FE0) or keyword in COERCED:
                continue
            if " or " in pydicom.datadict.dictionary_VR(tag):  # an ambiguous VR (US or SS) no JSON can name
                continue
            if keyword not in keys and keyword not in extra and len(extra) < MAX_INCLUDED:
                extra.append(keyword)
    return keys + tuple(extra)


def _header_attrs(settings: Settings, row: RecordFile, keywords: tuple[str, ...]) -> dict[str, Any]:
    """`keywords` of the row's header as DICOM JSON, each present (empty when the header lacks it)."""
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(keywords))
    subset = pydicom.Dataset()
    for keyword in keywords:
        if keyword in header:
            subset[keyword] = header[keyword]
    body = subset.to_json_dict()
    for keyword in keywords:
        tag = pydicom.tag.Tag(keyword)
        body.setdefault(f"{tag:08X}", {"vr": pydicom.datadict.dictionary_VR(tag)})
    return body


def _date_matches(value: str | None, wanted: str | None) -> bool:
    """DA single value or range matching (PS3.4 C.2.2.2.5), on YYYYMMDD."""
    if not wanted:
        return True
    low, dash, high = wanted.partition("-")
    if not dash:
        return value == low
    return bool(value) and (not low or low <= str(value)) and (not high or str(value) <= high)


def _text_key(value: str | None, wanted: str | None, m: Matching) -> bool:
    """A text key: `""` for no value (Empty Value Matching), any of a list (Multiple Value Matching)."""
    if m.wants_empty(wanted):
        return not value
    return not wanted or any(_text_matches(value or "", w) for w in m.values(wanted))


def _date_key(value: str | None, wanted: str | None, m: Matching) -> bool:
    if m.wants_empty(wanted):
        return not value
    return not wanted or any(_date_matches(value, w) for w in m.values(wanted))


def _text_matches(value: str, wanted: str | None, *, ignore_case: bool = False) -> bool:
    """Single value matching, with wildcard matching when `wanted` holds `*` (any run of characters) or `?`
    (one character) (PS3.4 C.2.2.2.1, C.2.2.2.4). A viewer's study list sends what is typed as `*typed*`.
    `ignore_case` for person names, which PS3.4 leaves case-insensitive matching open to (stated in the
    conformance statement): a specialist typing `doe*` finds DOE^JANE."""
    if not wanted:
        return True
    pattern = re.escape(wanted).replace(r"\*", ".*").replace(r"\?", ".")
    flags = re.DOTALL | (re.IGNORECASE if ignore_case else 0)
    return re.fullmatch(pattern, value, flags=flags) is not None


INTEGER = re.compile(r"^[+-]?[0-9]{1,11}$")


def _integers(keyword: str, value: str | None) -> set[int] | None:
    """An IS matching key (one integer, or several separated by commas), None for universal matching (absent
    or empty), a 400 for anything else (PS3.18 8.3.4)."""
    if not value:
        return None
    numbers = [v.strip() for v in value.split(",")]
    if not all(INTEGER.match(n) and -(2**31) <= int(n) < 2**31 for n in numbers):
        raise HTTPException(
            400,
            f"{keyword} is an Integer String (IS): give a whole number such as {keyword}=2, or several "
            f"separated by commas; the value given is not one",
        )
    return {int(n) for n in numbers}


def _number_matches(
    attrs: dict[str, Any], keyword: str, wanted: set[int] | None, empty: bool = False
) -> bool:
    values = attrs.get(f"{pydicom.tag.Tag(keyword):08X}", {}).get("Value") or []
    if empty:
        return not values  # Empty Value Matching: absent or empty
    if wanted is None:
        return True
    try:
        return bool(values) and int(values[0]) in wanted
    except (TypeError, ValueError):
        return False  # a stored value that is no integer matches no number


Limit = Annotated[int | None, Query(ge=1, le=10000)]
Offset = Annotated[int, Query(ge=0)]


@router.get("/cases/{case_id}/studies", response_class=DicomJsonResponse, responses=QIDO_ANSWER)
def search_studies(
    case_id: CaseId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    StudyInstanceUID: str | None = None,  # noqa: N803 - DICOMweb names query keys by keyword
    ModalitiesInStudy: str | None = None,  # noqa: N803
    PatientID: str | None = None,  # noqa: N803
    AccessionNumber: str | None = None,  # noqa: N803
    StudyDate: str | None = None,  # noqa: N803
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    _negotiate(request, DICOM_JSON)
    warned = _not_honoured(request, settings, case_id)
    m = matching(request)
    study_keys = _included(request, STUDY_KEYS)
    ids = _identifiers(session, case_id)
    if not (
        _text_key(ids["PatientID"], PatientID, m) and _text_key(ids["AccessionNumber"], AccessionNumber, m)
    ):
        return _dicom_json([], headers=warned)  # every study of a case carries our identifiers
    files = _released(session, case_id, study_instance_uid=StudyInstanceUID)
    studies: dict[str, list[RecordFile]] = {}
    for f in files:
        studies.setdefault(str(f.study_instance_uid), []).append(f)
    wanted = set(_value_list(ModalitiesInStudy or "")) - {""}
    results = []
    for uid, members in studies.items():
        modalities = sorted({str(m.modality) for m in members})
        date = next((m.study_date for m in members if m.study_date), None)
        if m.wants_empty(ModalitiesInStudy):
            if any(member.modality for member in members):
                continue
        elif wanted and not wanted & set(modalities):
            continue
        if not _date_key(date, StudyDate, m):
            continue
        results.append(
            {
                **_header_attrs(settings, members[0], study_keys),
                **ONLINE,
                "0020000D": _attr("UI", uid),
                "00080020": _attr("DA", *([date] if date else [])),
                "00080050": _attr("SH", ids["AccessionNumber"]),
                "00080061": _attr("CS", *modalities),
                "00100020": _attr("LO", ids["PatientID"]),
                "00201206": _attr("IS", len({m.series_instance_uid for m in members})),
                "00201208": _attr("IS", len(members)),
                "00081190": _attr("UR", f"{settings.records_url}/dicomweb/cases/{case_id}/studies/{uid}"),
            }
        )
    return _dicom_json(_page(results, limit, offset), headers=warned)


@router.get(
    "/cases/{case_id}/studies/{study}/series", response_class=DicomJsonResponse, responses=QIDO_ANSWER
)
def search_series(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    Modality: str | None = None,  # noqa: N803
    SeriesInstanceUID: str | None = None,  # noqa: N803
    SeriesNumber: str | None = None,  # noqa: N803
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    _negotiate(request, DICOM_JSON)
    warned = _not_honoured(request, settings, case_id)
    m = matching(request)
    series_keys = _included(request, SERIES_KEYS)
    numbers = None if m.wants_empty(SeriesNumber) else _integers("SeriesNumber", SeriesNumber)
    _identifiers(session, case_id)
    series: dict[str, list[RecordFile]] = {}
    no_modality = m.wants_empty(Modality)
    found = _released(
        session,
        case_id,
        empty=("modality",) if no_modality else (),
        study_instance_uid=study,
        modality=None if no_modality else Modality,
        series_instance_uid=SeriesInstanceUID,
    )
    for f in found:
        series.setdefault(str(f.series_instance_uid), []).append(f)
    base = f"{settings.records_url}/dicomweb/cases/{case_id}/studies/{study}/series"
    results = []
    for uid, members in series.items():
        attrs = _header_attrs(settings, members[0], series_keys)
        if not _number_matches(attrs, "SeriesNumber", numbers, m.wants_empty(SeriesNumber)):
            continue
        results.append(
            {
                **attrs,
                "0020000D": _attr("UI", study),
                "0020000E": _attr("UI", uid),
                "00080060": _attr("CS", members[0].modality),
                "00201209": _attr("IS", len(members)),
                "00081190": _attr("UR", f"{base}/{uid}"),
            }
        )
    return _dicom_json(_page(results, limit, offset), headers=warned)


@router.get(
    "/cases/{case_id}/studies/{study}/instances",
    response_class=DicomJsonResponse,
    responses=QIDO_ANSWER,
)
@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances",
    response_class=DicomJsonResponse,
    responses=QIDO_ANSWER,
)
def search_instances(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    series: str | None = None,
    Modality: str | None = None,  # noqa: N803 - series keys match in a query of a study's instances
    SeriesInstanceUID: str | None = None,  # noqa: N803
    SeriesNumber: str | None = None,  # noqa: N803
    SOPInstanceUID: str | None = None,  # noqa: N803
    SOPClassUID: str | None = None,  # noqa: N803
    InstanceNumber: str | None = None,  # noqa: N803
    limit: Limit = None,
    offset: Offset = 0,
) -> JSONResponse:
    _negotiate(request, DICOM_JSON)
    warned = _not_honoured(request, settings, case_id)
    m = matching(request)
    instance_keys = _included(request, INSTANCE_KEYS)
    series_numbers = None if m.wants_empty(SeriesNumber) else _integers("SeriesNumber", SeriesNumber)
    instance_numbers = None if m.wants_empty(InstanceNumber) else _integers("InstanceNumber", InstanceNumber)
    empty = tuple(
        column
        for column, value in (("modality", Modality), ("sop_class_uid", SOPClassUID))
        if m.wants_empty(value)
    )
    _identifiers(session, case_id)
    if series and SeriesInstanceUID and series not in _value_list(SeriesInstanceUID):
        return _dicom_json([], headers=warned)  # the key and the path name different series
    files = _released(
        session,
        case_id,
        study_instance_uid=study,
        empty=empty,
        series_instance_uid=series or SeriesInstanceUID,
        modality=None if "modality" in empty else Modality,
        sop_instance_uid=SOPInstanceUID,
        sop_class_uid=None if "sop_class_uid" in empty else SOPClassUID,
    )
    base = f"{settings.records_url}/dicomweb/cases/{case_id}/studies/{study}/series"
    results = []
    for f in files:
        attrs = _header_attrs(settings, f, instance_keys)
        if not (
            _number_matches(attrs, "SeriesNumber", series_numbers, m.wants_empty(SeriesNumber))
            and _number_matches(attrs, "InstanceNumber", instance_numbers, m.wants_empty(InstanceNumber))
        ):
            continue
        results.append(
            {
                **attrs,
                **ONLINE,
                "00081190": _attr("UR", f"{base}/{f.series_instance_uid}/instances/{f.sop_instance_uid}"),
                "0020000D": _attr("UI", f.study_instance_uid),
                "0020000E": _attr("UI", f.series_instance_uid),
                "00080018": _attr("UI", f.sop_instance_uid),
                "00080016": _attr("UI", *([f.sop_class_uid] if f.sop_class_uid else [])),
                "00080060": _attr("CS", f.modality),
                "00280008": _attr("IS", f.number_of_frames or 1),
            }
        )
    return _dicom_json(_page(results, limit, offset), headers=warned)


# --- WADO-RS -------------------------------------------------------------------------------------


def _retrievable(
    session: Session, case_id: str, study: str, series: str | None, sop: str | None
) -> tuple[list[RecordFile], dict[str, str]]:
    ids = _identifiers(session, case_id)
    files = _released(
        session, case_id, study_instance_uid=study, series_instance_uid=series, sop_instance_uid=sop
    )
    if not files:
        raise HTTPException(
            404, "nothing released in this case matches these UIDs; search with QIDO-RS first"
        )
    return files, ids


def _modified_at(session: Session, row: RecordFile) -> datetime:
    held = session.get(RecordImport, row.import_id) if row.import_id else None
    return (held.decided_at or held.created_at) if held else row.created_at


@router.get("/cases/{case_id}/studies/{study}", response_class=StreamingResponse, responses=INSTANCES)
@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}", response_class=StreamingResponse, responses=INSTANCES
)
@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}",
    response_class=StreamingResponse,
    responses={200: {**INSTANCES[200], "content": {MULTIPART: BINARY, "application/dicom": BINARY}}},
)
def retrieve(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    series: str | None = None,
    sop: str | None = None,
) -> StreamingResponse:
    # A single instance may also be asked for as one application/dicom body (PS3.18 10.4.4).
    offered = ["multipart/related;type=application/dicom", *(["application/dicom"] if sop else [])]
    _negotiate(request, *offered)  # a media type never served is a 406 before anything is looked up
    files, ids = _retrievable(session, case_id, study, series, sop)
    store = ObjectStore.for_settings(settings)
    parts = [(store.local_path(f.storage_path, f.sha256), _modified_at(session, f)) for f in files]
    served = {_served_syntax(path) for path, _ in parts}
    # Each range in turn: a client lists the transfer syntaxes it prefers, then transfer-syntax=*; the
    # first range alone was taken, and a preferred syntax other than the stored one was a 406.
    offer, _ = _negotiate(
        request,
        *offered,
        takes=lambda params: (
            params.get("transfer-syntax", "*") in ("*", *(served if len(served) == 1 else ()))
        ),
        refusal="no transcoding here: ask for transfer-syntax=* (stored as received)",
    )
    if offer == "application/dicom":
        path, modified_at = parts[-1]
        chunks = iter(()) if is_head(request) else coerced_chunks(path, ids, modified_at)
        return StreamingResponse(chunks, media_type="application/dicom")
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        for path, modified_at in parts:
            yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
            yield from coerced_chunks(path, ids, modified_at)
            yield b"\r\n"
        yield f"--{boundary}--\r\n".encode()

    return StreamingResponse(
        iter(()) if is_head(request) else body(),  # HEAD: the headers alone, no instance read
        media_type=f'multipart/related; type="application/dicom"; boundary={boundary}',
    )


@router.get(
    "/cases/{case_id}/studies/{study}/metadata", response_class=DicomJsonResponse, responses=DICOM_JSON_ANSWER
)
@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/metadata",
    response_class=DicomJsonResponse,
    responses=DICOM_JSON_ANSWER,
)
@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/metadata",
    response_class=DicomJsonResponse,
    responses=DICOM_JSON_ANSWER,
)
def retrieve_metadata(
    case_id: CaseId,
    study: Uid,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    series: str | None = None,
    sop: str | None = None,
) -> JSONResponse:
    _negotiate(request, DICOM_JSON)
    files, ids = _retrievable(session, case_id, study, series, sop)
    store = ObjectStore.for_settings(settings)
    base = f"{settings.records_url}/dicomweb/cases/{case_id}"
    metadata = []
    for f in files:
        item = coerced_header(store.local_path(f.storage_path, f.sha256), ids, _modified_at(session, f))
        body = item.to_json_dict()
        if "Rows" in item:  # the pixel data, left out of the header, is there as Bulkdata (PS3.18 10.4.3.3.2)
            url = f"{base}/studies/{f.study_instance_uid}/series/{f.series_instance_uid}/instances/{f.sop_instance_uid}"
            frames = ",".join(str(n) for n in range(1, (f.number_of_frames or 1) + 1))
            if item.file_meta.get("TransferSyntaxUID") in VIDEO_TYPES:
                frames = "1"  # a video's frames are one bitstream, answered whole
            body["7FE00010"] = {"vr": "OB", "BulkDataURI": f"{url}/frames/{frames}"}
        metadata.append(body)
    return _dicom_json(metadata)


FRAME_TYPES = {
    pydicom.uid.JPEGBaseline8Bit: "image/jpeg",
    pydicom.uid.JPEGExtended12Bit: "image/jpeg",
    pydicom.uid.JPEGLossless: "image/jpeg",
    pydicom.uid.JPEGLosslessSV1: "image/jpeg",
    pydicom.uid.JPEGLSLossless: "image/jls",
    pydicom.uid.JPEGLSNearLossless: "image/jls",
    pydicom.uid.JPEG2000Lossless: "image/jp2",
    pydicom.uid.JPEG2000: "image/jp2",
    pydicom.uid.RLELossless: "image/dicom-rle",
}
# Video: the pixel data is one bitstream, not frames (PS3.5 8.2.5 to 8.2.8); media types of PS3.18 Table 8.7.3-5.
VIDEO_TYPES = {
    **dict.fromkeys(pydicom.uid.MPEGTransferSyntaxes[:4], "video/mpeg2"),
    **dict.fromkeys(pydicom.uid.MPEGTransferSyntaxes[4:14], "video/mp4"),
    **dict.fromkeys(pydicom.uid.MPEGTransferSyntaxes[14:], "video/H265"),
}
STORED_TYPES = {**FRAME_TYPES, **VIDEO_TYPES}
# Names clients still send for the same media types (dicomweb-client asks for image/x-dicom-rle).
MEDIA_TYPE_ALIASES = {"image/x-dicom-rle": "image/dicom-rle", "image/x-jls": "image/jls"}


def _frame_part_type(accept: str | None, syntax: str, compressed: bool) -> str | None:
    """The media type frames stored in `syntax` are served in, if the Accept header takes them as stored: its
    first media range (by q, then order) that does (PS3.18 8.7.3.5, 8.7.5). Native frames are
    application/octet-stream, compressed ones their own type (or application/octet-stream with
    transfer-syntax=*, as a viewer asks: "send them as you have them"). None when no range takes them: there
    is no transcoding here. A viewer lists the compressed forms it decodes and the native one last, so the
    first range is often one these frames are not in; it was taken alone, and the answer was a 406."""
    own = STORED_TYPES.get(pydicom.uid.UID(syntax), "application/octet-stream") if compressed else None
    for kind, params in media_ranges(accept):
        if kind in ("*/*", "multipart/*"):
            return own or "application/octet-stream"
        if kind != "multipart/related":
            continue
        asked = params.get("type", "application/octet-stream").lower()
        asked = MEDIA_TYPE_ALIASES.get(asked, asked)
        wanted = params.get("transfer-syntax")
        if wanted not in (None, "*", syntax):
            continue
        if asked in ("*/*", "application/octet-stream", "application/*"):
            return own or "application/octet-stream"
        if own and (asked == own or asked == own.split("/")[0] + "/*"):
            return own
    return None


def _served_syntax(path: FilePath) -> str:
    """The transfer syntax WADO-RS hands `path` out in (Implicit VR Little Endian becomes Explicit)."""
    syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return str(pydicom.uid.ExplicitVRLittleEndian if syntax == pydicom.uid.ImplicitVRLittleEndian else syntax)


@router.get(
    "/cases/{case_id}/studies/{study}/series/{series}/instances/{sop}/frames/{frames}",
    response_class=StreamingResponse,
    responses={
        200: {"description": "the frames, one part each (PS3.18 8.7.3)", "content": {MULTIPART: BINARY}}
    },
)
def retrieve_frames(
    case_id: CaseId,
    study: Uid,
    series: Uid,
    sop: Uid,
    frames: Annotated[str, Path(pattern=r"^[1-9][0-9]{0,5}(,[1-9][0-9]{0,5})*$")],
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
) -> StreamingResponse:
    """Frames as stored (PS3.18 10.4.1.1.4): native frames as application/octet-stream, compressed ones in
    their own media type; what a viewer (OHIF, Cornerstone's wadors loader) fetches to show an image. A
    deflated instance (an older cart's) is inflated whole, as when it is handed out whole (rewrite.py), and
    its native frames served as Explicit VR Little Endian."""
    files, _ = _retrievable(session, case_id, study, series, sop)
    row = files[-1]
    path = ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256)
    with path.open("rb") as fp:
        header = pydicom.dcmread(fp, stop_before_pixels=True)
        pixel_offset = fp.tell()
    syntax = header.file_meta.TransferSyntaxUID
    inflated: bytes | None = None
    if syntax == pydicom.uid.DeflatedExplicitVRLittleEndian:  # no offsets into a deflated body: read whole
        header = pydicom.dcmread(path)
        inflated = bytes(header.get("PixelData") or b"")
        syntax = pydicom.uid.ExplicitVRLittleEndian
    count = int(header.get("NumberOfFrames") or 1)
    numbers = [int(n) for n in frames.split(",")]
    if "Rows" not in header or any(n > count for n in numbers):
        raise HTTPException(404, f"this instance has {count} frame(s) of pixel data; ask for 1 to {count}")
    native = not syntax.is_compressed
    part_type = _frame_part_type(request.headers.get("accept"), str(syntax), compressed=not native)
    if part_type is None:
        stored_as = (
            "application/octet-stream" if native else STORED_TYPES.get(syntax, "application/octet-stream")
        )
        raise HTTPException(
            406,
            f'the frames are stored as {syntax} ({stored_as}); ask for multipart/related; type="{stored_as}" '
            f"with transfer-syntax=* or {syntax}",
        )
    frame_bytes = (
        int(header.Rows)
        * int(header.Columns)
        * int(header.get("SamplesPerPixel") or 1)
        * int(header.get("BitsAllocated") or 8)
        // 8
    )
    element_header = 8 if syntax == pydicom.uid.ImplicitVRLittleEndian else 12
    boundary = uuid.uuid4().hex
    part_head = f"--{boundary}\r\nContent-Type: {part_type}; transfer-syntax={syntax}\r\n\r\n".encode()
    if is_head(request):
        body: Iterator[bytes] = iter(())  # the headers alone, no frame read
    elif syntax in VIDEO_TYPES:
        body = _video_part(path, pixel_offset + element_header, part_head, boundary)
    elif native:
        body = _native_parts(
            path, pixel_offset + element_header, inflated, frame_bytes, numbers, part_head, boundary
        )
    else:
        body = iter(
            _encapsulated_parts(path, pixel_offset + element_header, count, numbers, part_head, boundary)
        )
    return StreamingResponse(body, media_type=f'multipart/related; type="{part_type}"; boundary={boundary}')


def _native_parts(
    path: FilePath,
    pixels_at: int,
    inflated: bytes | None,
    frame_bytes: int,
    numbers: list[int],
    part_head: bytes,
    boundary: str,
) -> Iterator[bytes]:
    with path.open("rb") as fp:
        for n in numbers:
            if inflated is not None:
                data = inflated[(n - 1) * frame_bytes : n * frame_bytes]
            else:
                fp.seek(pixels_at + (n - 1) * frame_bytes)
                data = fp.read(frame_bytes)
            yield from (part_head, data, b"\r\n")
    yield f"--{boundary}--\r\n".encode()


def _encapsulated_parts(
    path: FilePath, pixels_at: int, count: int, numbers: list[int], part_head: bytes, boundary: str
) -> list[bytes]:
    """The frames asked for, each found before the answer starts: pixel data that cannot be split into its
    frames was found only while streaming, and the connection was cut mid-answer."""
    body = []
    with path.open("rb") as fp:
        for n in numbers:
            fp.seek(pixels_at)
            try:
                data = pydicom.encaps.get_frame(fp, n - 1, number_of_frames=count)
            except ValueError:
                raise HTTPException(
                    406,
                    f"this instance's encapsulated pixel data cannot be split into its {count} frames; "
                    "retrieve the whole instance instead",
                ) from None
            body += [part_head, data, b"\r\n"]
    return [*body, f"--{boundary}--\r\n".encode()]


def _video_part(path: FilePath, pixels_at: int, part_head: bytes, boundary: str) -> Iterator[bytes]:
    """A video's whole bitstream as one part, whichever frames were asked for: its frames are not stored apart
    (a frame of it was looked up as a fragment, and the answer broke off)."""
    with path.open("rb") as fp:
        fp.seek(pixels_at)
        pydicom.encaps.parse_basic_offsets(fp)
        yield part_head
        yield from pydicom.encaps.generate_fragments(fp)
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


# Rendered images, thumbnails, WADO-URI and signed links: on this router, so under the same scope, audit and
# rate bucket.
from services.records import links, rendered, wado_uri  # noqa: E402 - they use this module's helpers

router.include_router(rendered.router)
router.include_router(wado_uri.router)
router.include_router(links.router)
