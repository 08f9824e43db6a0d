"""Each service's OpenAPI document declares its errors as they are sent, so a client generated from it parses them.

Every error is a problem (`application/problem+json`, RFC 9457: `title`, `status`, `detail`, `errors`), or under
`/fhir` an OperationOutcome (`application/fhir+json`); see services.common.http.error_for. FastAPI's document
said `application/json` and, for a 422, its own `HTTPValidationError` shape, which no response has. Some answers
come from the shared app, whatever the route declares, and are added to every operation they can reach:

- 422: a NUL character in the URL (BodyGuard) or a parameter that does not fit its schema;
- 413 (a body over the service's limit) and 400 (a body that cannot be decoded) where a body is taken;
- 401, 403 and 429 (the key's rate limit, with `Retry-After`) where an API key is required;
- 404 where the path names an object (a case, a review, ...): none visible to the caller's key;
- 503 (the database is unavailable, with `Retry-After`) wherever a route reads the database;
- 406, and 415 where a body is taken, under `/fhir` (FHIR R4 JSON only: services.common.http.fhir_json_only).

A 2xx answer is declared as it is sent: a route that answers FHIR JSON itself no longer also declares FastAPI's
`application/json` without a schema, and a FHIR answer declares at least a resource (`resourceType`).

A path parameter is declared as it is taken: present and never null. A handler shared by routes at several
depths (DICOMweb's study, series and instance) takes the deeper ids as optional, and FastAPI declared them
`anyOf: [string, null]` in the path, which client generators refuse (the route was left out of the client).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

PROBLEM_JSON = "application/problem+json"
FHIR_JSON = "application/fhir+json"
GENERIC = {"application/json", PROBLEM_JSON, FHIR_JSON}  # what FastAPI or the routes said for an error
BODY_METHODS = {"post", "put", "patch"}
NO_DATABASE = {"/healthz", "/metrics", "/readyz"}  # /readyz declares its own 503


class FieldError(BaseModel):
    field: str = Field(examples=["patient.birth_date"])
    message: str = Field(examples=["Field required"])


class Problem(BaseModel):
    """What went wrong and what to do; never echoes the values sent."""

    title: str = Field(examples=["Invalid request"])
    status: int = Field(examples=[422])
    detail: str = Field(examples=["The request does not match the schema; fix the fields listed."])
    errors: list[FieldError] | None = None


class OutcomeIssue(BaseModel):
    severity: str = Field(examples=["error"])
    code: str = Field(examples=["invalid"])
    diagnostics: str
    expression: list[str] | None = Field(default=None, examples=[["Bundle.entry[0].resource.birthDate"]])


class OperationOutcome(BaseModel):
    """A FHIR R4 OperationOutcome (the subset the services send)."""

    resourceType: str = Field(default="OperationOutcome", examples=["OperationOutcome"])  # noqa: N815 - FHIR name
    issue: list[OutcomeIssue]


# What the shared app answers on any route it can reach: status -> (description, detail, FHIR issue code).
COMMON: dict[str, tuple[str, str, str]] = {
    "400": ("The body cannot be decoded (not UTF-8, nested too deeply, a number too long)",
            "the body is not UTF-8 text; send the JSON encoded as UTF-8; nothing was stored", "structure"),
    "401": ("No API key, or it is invalid or revoked", "an API key is required: send …", "login"),
    "403": ("The key's role may not do this", "this needs the role operations; your key has …", "forbidden"),
    "404": ("The path names nothing visible to your key (another partner's case is a 404 too)",
            "no case visible to your key; check the case id", "not-found"),
    "406": ("Only FHIR R4 JSON is served: `_format` or `Accept` ruled it out",
            "only JSON is served: send _format=json or Accept: application/fhir+json", "not-supported"),
    "413": ("The body is larger than this service takes", "the request body is larger than …", "too-costly"),
    "422": ("A parameter or the body does not match the schema (a NUL character in the URL included); "
            "`errors` names each field, never its value",
            "The request does not match the schema; fix the fields listed.", "invalid"),
    "415": ("The body is not FHIR R4 JSON", "send the resource as JSON, with Content-Type: application/fhir+json",
            "not-supported"),
    "429": ("The key's rate limit is spent; retry after `Retry-After` seconds",
            "too many requests for this key; retry after the seconds in Retry-After", "throttled"),
    "503": ("The database was unavailable; retry after `Retry-After` seconds with the same Idempotency-Key",
            "The database was unavailable while answering. Retry in a moment.", "transient"),
}  # fmt: skip
RETRY_AFTER = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}


def _on_fhir_path(path: str) -> bool:
    return path == "/fhir" or path.startswith("/fhir/")


def _statuses(path: str, method: str, operation: dict[str, Any]) -> list[str]:
    """The error statuses the shared app may answer on this operation, whatever the route declares."""
    found = ["422"]
    if operation.get("security"):
        found += ["401", "403", "429"]
    if "{" in path:
        found += ["404"]
    if method in BODY_METHODS:
        found += ["400", "413"]
    if path not in NO_DATABASE:
        found += ["503"]
    if _on_fhir_path(path):  # services.common.http.fhir_json_only guards every FHIR route
        found += ["406", *(["415"] if method in BODY_METHODS else [])]
    return found


def _example(content: dict[str, Any], fhir: bool) -> Any:
    """The example a route gave its error, if it has the shape that is sent."""
    for media in content.values():
        example = media.get("example")
        if isinstance(example, dict) and (example.get("resourceType") == "OperationOutcome") == fhir:
            return example
    return None


def _default_example(status: str, detail: str, code: str, fhir: bool) -> dict[str, Any]:
    if fhir:
        return {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": code, "diagnostics": detail}],
        }
    return {"title": "Error", "status": int(status), "detail": detail}


def _path_parameters_present(operation: dict[str, Any]) -> None:
    for parameter in operation.get("parameters", []):
        schema = parameter.get("schema", {})
        if parameter.get("in") != "path" or "anyOf" not in schema:
            continue
        present = [branch for branch in schema["anyOf"] if branch.get("type") != "null"]
        if len(present) == 1:
            del schema["anyOf"]
            schema.update(present[0])


FHIR_RESOURCE = {
    "type": "object",
    "description": "a FHIR R4 resource (https://hl7.org/fhir/R4/resourcelist.html)",
    "properties": {"resourceType": {"type": "string"}},
    "required": ["resourceType"],
}


def _answers_declared(responses: dict[str, Any]) -> None:
    """A route that answers FHIR JSON (or DICOM JSON) itself got FastAPI's `application/json` with no schema
    beside it, a type it never sends; and a FHIR answer with no schema is at least a resource."""
    for status, response in responses.items():
        content = response.get("content") or {}
        if not status.startswith("2"):
            continue
        bare_json = "application/json" in content and not (content["application/json"] or {}).get("schema")
        if bare_json and any(kind.endswith("+json") for kind in content):
            del content["application/json"]
        if FHIR_JSON in content and not (content[FHIR_JSON] or {}).get("schema"):
            content[FHIR_JSON] = {**(content[FHIR_JSON] or {}), "schema": FHIR_RESOURCE}


def conform_document(document: dict[str, Any]) -> dict[str, Any]:
    """`document` with each operation's errors and path parameters declared as they are (see the module
    docstring); changed in place."""
    ref = "#/components/schemas/{model}"
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for body in (Problem, OperationOutcome):
        found = body.model_json_schema(ref_template=ref)
        schemas.update(found.pop("$defs", {}))
        schemas[body.__name__] = found
    for path, operations in document.get("paths", {}).items():
        fhir = _on_fhir_path(path)
        media_type, model = (FHIR_JSON, "OperationOutcome") if fhir else (PROBLEM_JSON, "Problem")
        for method, operation in operations.items():
            _path_parameters_present(operation)
            responses = operation.setdefault("responses", {})
            _answers_declared(responses)
            for status in _statuses(path, method, operation):
                description, detail, code = COMMON[status]
                responses.setdefault(status, {"description": description, "content": {}})
            for status, response in responses.items():
                if not status.isdigit() or int(status) < 400 or response.get("x-own-body"):
                    continue  # x-own-body: a body a standard fixes (RFC 6749 §5.2 at the token endpoint)
                default = COMMON.get(status, ("", response.get("description", ""), "exception"))
                example = _example(response.get("content", {}), fhir) or _default_example(
                    status, default[1], default[2], fhir
                )
                # A body of its own a route declares (STOW-RS's 409 is a DICOM Store Instances Response) stays.
                own = {
                    kind: media for kind, media in response.get("content", {}).items() if kind not in GENERIC
                }
                response["content"] = {
                    **own,
                    media_type: {"schema": {"$ref": f"#/components/schemas/{model}"}, "example": example},
                }
                if status in ("429", "503"):
                    response.setdefault("headers", {}).update(RETRY_AFTER)
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return document
