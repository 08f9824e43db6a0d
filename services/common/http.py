"""The FastAPI app every service shares: /healthz, /readyz, /metrics, and error bodies without PHI."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractAsyncContextManager
from typing import Any
from urllib.parse import parse_qsl

import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.telemetry import TelemetryConfig
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DataError, DBAPIError, OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import IntakeRejected, RecordsRejected, human_size
from services.common.openapi import conform_document
from services.common.tracing import server_span

log = structlog.get_logger(__name__)

NO_NATIVE_TELEMETRY: TelemetryConfig = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}

REQUESTS = Counter("http_requests_total", "HTTP requests", ["service", "method", "route", "status"])
LATENCY = Histogram("http_request_seconds", "HTTP request latency", ["service", "route"])


PROBLEM_JSON = "application/problem+json"  # RFC 9457 section 3
FHIR_ISSUE_CODES = {401: "login", 403: "forbidden", 404: "not-found", 405: "not-supported", 406: "not-supported",
                    409: "conflict", 413: "too-costly", 415: "not-supported", 422: "invalid", 429: "throttled",
                    503: "transient"}  # fmt: skip


FHIR_JSON = "application/fhir+json"
JSON_FORMATS = {"json", FHIR_JSON, "application/json"}
ACCEPTED = {FHIR_JSON, "application/json", "application/*", "*/*"}


def _media_types(header: str) -> list[str]:
    """The media types of an Accept or Content-Type header, without parameters, lower case."""
    return [part.split(";")[0].strip().lower() for part in header.split(",") if part.strip()]


FHIR_VERSION = "4.0"  # the fhirVersion mime-type parameter of FHIR R4 (4.0.1), major.minor


def _fhir_versions(header: str) -> list[tuple[str, str | None]]:
    """Each media type of an Accept or Content-Type header with its `fhirVersion` parameter, if any."""
    found = []
    for part in header.split(","):
        if not part.strip():
            continue
        kind, *params = part.split(";")
        version = next(
            (
                v.strip().strip('"')
                for k, _, v in (p.partition("=") for p in params)
                if k.strip().lower() == "fhirversion"
            ),
            None,
        )
        found.append((kind.strip().lower(), version))
    return found


def _speaks_r4(version: str | None) -> bool:
    return version is None or version == FHIR_VERSION or version.startswith(FHIR_VERSION + ".")


def fhir_json_only(request: Request) -> None:
    """FHIR R4 http.html#mime-type: this server speaks JSON only, and FHIR 4.0 only (#version-parameter).
    `_format` or an Accept that rules JSON (or FHIR 4.0) out is a 406, a body in another format or FHIR version
    a 415; either names what to send instead (RFC 9110 15.5.7, 15.5.16)."""
    wanted = request.query_params.get("_format")
    if wanted is not None and wanted.split(";")[0].strip().lower() not in JSON_FORMATS:
        raise StarletteHTTPException(406, f"only JSON is served: send _format=json or Accept: {FHIR_JSON}")
    accept = request.headers.get("accept")
    if accept and not any(kind in ACCEPTED and _speaks_r4(v) for kind, v in _fhir_versions(accept)):
        if ACCEPTED & set(_media_types(accept)):
            raise StarletteHTTPException(
                406,
                f"only FHIR R4 is served: send Accept: {FHIR_JSON}; fhirVersion={FHIR_VERSION}, or no fhirVersion",
            )
        raise StarletteHTTPException(406, f"only JSON is served: send Accept: {FHIR_JSON}")
    if request.method == "POST" and not request.url.path.endswith("/_search"):  # a search's form: fhir_search
        sent = _fhir_versions(request.headers.get("content-type") or "")
        if sent and sent[0][0] not in (FHIR_JSON, "application/json"):
            raise StarletteHTTPException(415, f"send the resource as JSON, with Content-Type: {FHIR_JSON}")
        if sent and not _speaks_r4(sent[0][1]):
            raise StarletteHTTPException(
                415,
                f"only FHIR R4 is read: send Content-Type: {FHIR_JSON}; fhirVersion={FHIR_VERSION}, or no fhirVersion",
            )


def problem(status: int, title: str, detail: str, errors: list[dict[str, Any]] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"title": title, "status": status, "detail": detail}
    if errors:
        body["errors"] = errors
    return JSONResponse(body, status_code=status, media_type=PROBLEM_JSON)


def _on_fhir_path(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


def error_for(request: Request, status: int, title: str, detail: str,
              errors: list[dict[str, Any]] | None = None) -> JSONResponse:  # fmt: skip
    """A problem, or on the FHIR paths an OperationOutcome (FHIR clients parse every error body as one)."""
    if not _on_fhir_path(request.url.path):
        return problem(status, title, detail, errors)
    issues = [(e["field"], e["message"]) for e in errors or []] or [(None, detail)]
    outcome = {
        "resourceType": "OperationOutcome",
        "issue": [
            {"severity": "error", "code": FHIR_ISSUE_CODES.get(status, "exception"), "diagnostics": text,
             **({"expression": [where]} if where else {})}
            for where, text in issues
        ],
    }  # fmt: skip
    return JSONResponse(outcome, status_code=status, media_type="application/fhir+json")


def _validation_detail(request: Request, exc: RequestValidationError) -> str:
    """What to fix. A JSON body sent without a JSON Content-Type is not read as JSON at all, and the error on
    the whole body ("Input should be a valid dictionary", no field) did not say why."""
    sent = _media_types(request.headers.get("content-type") or "")
    as_json = bool(sent) and sent[0].endswith(("/json", "+json"))
    if not as_json and any(tuple(error.get("loc", ())) == ("body",) for error in exc.errors()):
        return "The body was not read as JSON: send it with Content-Type: application/json."
    return "The request does not match the schema; fix the fields listed."


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    # The offending value is never echoed back: it may be a patient's name or birth date.
    return [
        {"field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"), "message": err.get("msg", "")}
        for err in exc.errors()
    ]


# What one JSON request may be: a FHIR transaction Bundle with a few documents of up to 10 MiB each (base64) fits.
# The ingress lets bodies up to records' limits through; each service bounds its own, so a body too large for
# a JSON service is refused there as it arrives, not read into memory.
MAX_JSON_BODY_BYTES = 64 * 1024 * 1024

# JSON escapes of what no text column can store: the NUL character, and a UTF-16 surrogate. A surrogate pair
# decodes to one character and is stored; a lone surrogate decodes to no character at all (PostgreSQL, and
# UTF-8 itself, refuse it), so the walk below tells the two apart. An escape counts when its backslash is not
# itself escaped (an even run of backslashes before it, none at all included). One pass, linear in the body.
UNSTORABLE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u(?:0000|[dD][89a-fA-F][0-9a-fA-F]{2})")
NUL_MESSAGE = "holds a NUL character (\\u0000), which cannot be stored; remove it"
SURROGATE_MESSAGE = (
    "holds a lone UTF-16 surrogate escape (\\ud800 to \\udfff), which encodes no character; send the text as "
    "UTF-8, or a character beyond U+FFFF as a surrogate pair"
)


def _unstorable_escapes(data: bytes) -> bool:
    """Whether `data` holds a JSON `\\u0000` or surrogate escape (not an escaped backslash before "u…")."""
    return UNSTORABLE_ESCAPE.search(data) is not None


def unstorable(text: str) -> str | None:
    """Why a text cannot be stored (NUL, lone surrogate), or None."""
    if "\x00" in text:
        return NUL_MESSAGE
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return SURROGATE_MESSAGE
    return None


def unstorable_field(document: Any, fhir: bool) -> tuple[str, str] | None:
    """Where the first text that no column can store is (a NUL character, a lone surrogate), and why: a FHIR
    element path ("Bundle.entry[1].resource.identifier[0].value") or, for the JSON API, the field as
    validation errors name it ("patient.given_name"). Walked without recursion: any depth json.loads reads."""
    found: tuple[list[str | int], str] | None = None
    pending: list[tuple[Any, list[str | int]]] = [(document, [])]
    while pending and found is None:
        node, path = pending.pop()
        if isinstance(node, str):
            reason = unstorable(node)
            found = (path, reason) if reason else None
            continue
        if isinstance(node, dict):
            items: list[tuple[str | int, Any]] = list(node.items())
        elif isinstance(node, list):
            items = list(enumerate(node))
        else:
            continue
        for key, _ in items:
            reason = unstorable(key) if isinstance(key, str) else None
            if reason:
                found = (path, reason)
                break
        pending.extend((value, [*path, key]) for key, value in reversed(items))  # the first item first
    if found is None:
        return None
    path, reason = found
    if not fhir:
        return ".".join(str(p) for p in path), reason
    root = document.get("resourceType", "") if isinstance(document, dict) else ""
    root = root if isinstance(root, str) and not unstorable(root) else ""
    return root + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path), reason


def _unstorable_in(body: bytes, fhir: bool) -> tuple[str, str] | None:
    """unstorable_field of a JSON body; None for one json.loads cannot read (malformed, nested too deep): it
    is handed on, and the endpoint's own parsing answers what is wrong with it."""
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        return None
    return unstorable_field(document, fhir=fhir)


def nul_in_url(scope: Scope) -> str | None:
    """Where a NUL character (%00) is in the request's URL: "path" or "query.<name>"; None if nowhere. No id
    or search value holds one, and PostgreSQL cannot compare a text with one."""
    if "\x00" in scope["path"]:
        return "path"
    query: bytes = scope.get("query_string", b"")
    if b"%00" not in query and b"\x00" not in query:
        return None
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return f"query.{name.replace(chr(0), '')}"
    return None


BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class BodyGuard:
    """What no service can take, refused before the endpoint runs, as a problem (an OperationOutcome on the
    FHIR paths):

    - a body over `limit` bytes (None: no bound here): 413, at once when its Content-Length says so, else as
      soon as the bytes received pass it (chunked bodies), never read into memory whole. Starlette's own
      limit answers in plain text.
    - a JSON body with a NUL character (`\\u0000`) or a lone surrogate (`\\ud800`) in a text: 422 naming the
      field. PostgreSQL cannot store either, so it would fail the request with a 500, or pass into a case
      and fail each service it reaches. A JSON body is read whole (the endpoint reads it whole anyway) and
      handed on once it is looked at.
    - a NUL character (`%00`) in the URL's path or query: 422 naming where. No id or search value holds one,
      and a look-up with it would fail in the database."""

    def __init__(self, app: ASGIApp, limit: int | None) -> None:
        self.app, self.limit = app, limit

    def _too_large(self, limit: int | None = None) -> str:
        bound = limit or self.limit
        assert bound is not None
        return (
            f"the request body is larger than the {human_size(bound)} this service takes; send documents "
            "and images to records (uploads, STOW-RS) and refer to them; nothing was stored"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        where = nul_in_url(scope)
        if where is not None:
            await self._refuse(
                scope, receive, send, 422, "Invalid request",
                "the URL holds a NUL character (%00); fix the part listed; nothing was read or changed",
                [{"field": where, "message": "holds a NUL character (%00), which no id or search value holds; remove it"}],
            )  # fmt: skip
            return
        headers = dict(scope["headers"])
        declared = headers.get(b"content-length", b"")
        if self.limit is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send, 413, "Request too large", self._too_large())
            return
        media_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        # The FHIR endpoints read a body sent without a Content-Type as JSON: looked at as JSON here too (a NUL
        # in one was taken into a case). The inbound webhook, which reads any body, checks its own.
        unlabelled_fhir = not media_type and scope["method"] in BODY_METHODS and _on_fhir_path(scope["path"])
        if media_type.endswith((b"/json", b"+json")) or unlabelled_fhir:
            await self._json(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if self.limit is not None and received > self.limit:
                    raise StarletteHTTPException(413, self._too_large())  # the app's handler answers it
            return message

        await self.app(scope, counted, send)

    async def _json(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A service that bounds its bodies per route (records) still reads no JSON body larger than a JSON
        # service would take: it is read whole here, before any route or key is looked at.
        limit = min(self.limit or MAX_JSON_BODY_BYTES, MAX_JSON_BODY_BYTES)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client left before its body was in
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, receive, send, 413, "Request too large", self._too_large(limit))
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        # A large body is scanned off the event loop, and one with an escape is read and walked there: tens of
        # MB on the loop would hold every other request meanwhile.
        escaped = (
            await run_in_threadpool(_unstorable_escapes, body)
            if size > 1024**2
            else _unstorable_escapes(body)
        )
        if escaped:
            found = await run_in_threadpool(_unstorable_in, body, _on_fhir_path(scope["path"]))
            if found is not None:
                field, reason = found
                what = "a NUL character" if reason == NUL_MESSAGE else "a lone surrogate escape"
                await self._refuse(
                    scope, receive, send, 422, "Invalid request",
                    f"a text of the request holds {what}; fix the fields listed; nothing was stored",
                    [{"field": field, "message": reason}],
                )  # fmt: skip
                return
        handed = False

        async def replayed() -> Message:
            nonlocal handed
            if not handed:
                handed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # a disconnect, for whoever waits for one

        await self.app(scope, replayed, send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, status: int, title: str, detail: str,
                      errors: list[dict[str, Any]] | None = None) -> None:  # fmt: skip
        await error_for(Request(scope, receive), status, title, detail, errors)(scope, receive, send)


class RequestMetrics:
    """Each request's server span, count and latency by route template (never the path: it holds ids).

    A plain ASGI middleware: Starlette's `@app.middleware("http")` runs every request, and every chunk of
    an upload's body, through an extra task group and stream, which profiled as a large share of the
    services' CPU under load."""

    def __init__(self, app: ASGIApp, service: str) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, status = scope["method"], 500  # an exception that escapes the app becomes a 500
        headers = {key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]}

        async def send_and_note_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with server_span(f"{method} {scope['path']}", headers) as span:
            try:
                await self.app(scope, receive, send_and_note_status)
            finally:
                route = getattr(scope.get("route"), "path", "unmatched")
                span.update_name(f"{method} {route}")
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", route)
                span.set_attribute("http.response.status_code", status)
                REQUESTS.labels(self.service, method, route, str(status)).inc()
                LATENCY.labels(self.service, route).observe(time.perf_counter() - started)


HEAD_OF_GET = "secondopinion.head"  # scope key: this GET is a HEAD request's (is_head)


def is_head(request: Request) -> bool:
    """Whether the GET being answered was asked for as HEAD: an endpoint may then skip producing its body (a
    stream of frames), and a read that hands out nothing is not audited as one."""
    return bool(request.scope.get(HEAD_OF_GET))


class HeadFileResponse(FileResponse):
    """A stored file, sent as FileResponse sends it, but for a HEAD answered as GET (`is_head`) the headers
    alone: Content-Length, Last-Modified and ETag from the file's metadata, the file not opened (HeadAsGet
    would drop the body, but only after reading the whole file)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope.get(HEAD_OF_GET):
            scope = {**scope, "method": "HEAD"}  # what FileResponse itself answers with headers only
        await super().__call__(scope, receive, send)


class HeadStreamingResponse(StreamingResponse):
    """A streamed body that is not produced at all for a HEAD answered as GET (`is_head`): the headers, an
    empty body, the stream closed unread, then any background task."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope.get(HEAD_OF_GET):
            await super().__call__(scope, receive, send)
            return
        closing = getattr(self.body_iterator, "aclose", None)
        if closing is not None:
            await closing()
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()


class HeadAsGet:
    """HEAD answered as GET is, without the body (RFC 9110 9.3.2), for every GET route of the app. FastAPI's
    routes take only the methods they declare, so a HEAD that viewers and proxies send to check a size or an
    ETag was a 405 (under /fhir an OperationOutcome saying only GET is allowed).

    The route sees a GET (`is_head` tells it otherwise); the server sees the HEAD it was sent, so it frames
    the answer as one. Content-Length is what the GET's would be where the route knows it before the body
    (JSON, a stored file); a streamed body's length is not worked out (RFC 9110 9.3.2 allows leaving it out).
    A route whose body is costly answers with HeadFileResponse or HeadStreamingResponse, which skip it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return
        as_get = {**scope, "method": "GET", HEAD_OF_GET: True}

        async def without_body(message: Message) -> None:
            if message["type"] != "http.response.body":
                await send(message)
            elif not message.get("more_body", False):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

        try:
            await self.app(as_get, receive, without_body)
        finally:
            if "route" in as_get:
                scope["route"] = as_get["route"]  # for RequestMetrics' route label


class UnreadableJson(ValueError):
    """A body that is not JSON json.loads can read; the message says why, never quoting the body."""


def json_problem(exc: BaseException) -> str | None:
    """Why json.loads could not read a body, from what it raised; None for anything else."""
    if isinstance(exc, UnicodeDecodeError):
        return "the body is not UTF-8 text; send the JSON encoded as UTF-8"
    if isinstance(exc, json.JSONDecodeError):  # its msg names what was expected, not what was found
        return f"the body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, RecursionError):
        return "the body nests arrays or objects too deeply to be read; send it flatter"
    if isinstance(exc, ValueError) and "digits" in str(exc):  # int(): sys.get_int_max_str_digits()
        return "the body holds a number with more digits than can be read (4300 at most); send it shorter"
    return None


def parse_json(body: bytes) -> Any:
    """The JSON document of a body a service reads itself (FHIR resources): UnreadableJson says what is wrong
    with one that is not readable JSON. Each of these was a 500 where only some were caught."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise UnreadableJson(json_problem(exc) or "the body is not JSON") from exc


def _unreadable_body(exc: StarletteHTTPException) -> str | None:
    """What was wrong with a JSON body FastAPI could not decode for a reason other than its syntax (a syntax
    error is a 422 naming the position): FastAPI itself only says "There was an error parsing the body"."""
    problem = json_problem(exc.__cause__) if exc.status_code == 400 and exc.__cause__ else None
    return f"{problem}; nothing was stored" if problem else None


class Readiness(BaseModel):
    status: str = Field(examples=["ready"])
    service: str = Field(examples=["intake"])


def create_app(
    service: str,
    *,
    routers: Iterable[APIRouter],
    engine: Callable[[], Engine],
    ready_checks: Iterable[Callable[[], bool]] = (),
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    title: str | None = None,
    max_body_bytes: int | None = MAX_JSON_BODY_BYTES,
) -> FastAPI:
    """`max_body_bytes` bounds every request body as it streams in (413 past it); None leaves each route to
    bound its own (records: uploads, STOW-RS and archives stream to disk under their own limits)."""
    app = FastAPI(
        title=title or f"secondopinion {service}",
        version="0.1.0",
        lifespan=lifespan,
        # FastAPI's own OpenTelemetry middleware switches itself on once a tracer provider is installed: a
        # second SERVER span beside RequestMetrics' own, three more spans per request (dependencies,
        # endpoint, serialization), and exception messages in span events, which could carry PHI.
        telemetry=NO_NATIVE_TELEMETRY,
    )
    app.add_middleware(HeadAsGet)
    app.add_middleware(BodyGuard, limit=max_body_bytes)
    app.add_middleware(RequestMetrics, service=service)
    checks = list(ready_checks)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_for(
            request, 422, "Invalid request", _validation_detail(request, exc), _validation_errors(exc)
        )

    @app.exception_handler(IntakeRejected)
    async def on_rejected(_: Request, exc: IntakeRejected) -> JSONResponse:
        return problem(422, "Request rejected", str(exc))

    @app.exception_handler(RecordsRejected)
    async def on_records_rejected(_: Request, exc: RecordsRejected) -> JSONResponse:
        return problem(422, "File rejected", str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = error_for(request, exc.status_code, "Error", _unreadable_body(exc) or str(exc.detail))
        response.headers.update(exc.headers or {})  # Retry-After, WWW-Authenticate
        return response

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("http.unexpected_error", path=request.url.path, error=type(exc).__name__)
        return error_for(
            request, 500, "Internal error", "Something failed on our side; nothing was changed. Retry later."
        )

    @app.exception_handler(DBAPIError)
    async def on_database_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if isinstance(exc, DataError):  # a value the column cannot hold; the transaction was rolled back
            log.warning("http.value_not_storable", path=request.url.path, error=type(exc.orig).__name__)
            return error_for(
                request,
                422,
                "Value cannot be stored",
                "A value of the request cannot be stored as sent (a number or a date out of range, or a "
                "character a text cannot hold); fix it and send the request again; nothing was stored.",
            )
        if not (exc.connection_invalidated or isinstance(exc, OperationalError)):
            return await on_unexpected(request, exc)
        # A lost connection (a restart or failover: the pool is renewed) or a database that could not
        # serve the statement now; either way the client retries.
        log.warning("http.database_unavailable", path=request.url.path, error=type(exc.orig).__name__)
        response = error_for(
            request,
            503,
            "Database unavailable",
            "The database was unavailable while answering. Retry in a moment; repeat a POST with the "
            "same Idempotency-Key so it is applied once.",
        )
        response.headers["Retry-After"] = "1"
        return response

    @app.get("/healthz", tags=["ops"], include_in_schema=True)
    def healthz() -> dict[str, str]:
        return {"status": "ok", "service": service}

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={200: {"model": Readiness}, 503: {"description": "a dependency is not reachable"}},
    )
    def readyz() -> Response:
        try:
            with engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:
            return problem(503, "Not ready", "The database is not reachable.")
        if not all(check() for check in checks):
            return problem(503, "Not ready", "The message broker is not connected.")
        return JSONResponse({"status": "ready", "service": service})

    @app.get("/metrics", tags=["ops"], response_class=PlainTextResponse)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)

    default_openapi = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = conform_document(default_openapi())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app
