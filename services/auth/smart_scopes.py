"""SMART `system/` scopes: what a token may carry, and which scope a request needs.

A scope reads `system/<resource type or *>.<permissions>`, in SMART v1 form (`read`, `write`, `*`) or v2 form
(letters of `cruds`). `read` is `rs`, `write` is `cud`, `*` is all five.

What a request needs (README "SMART Backend Services"):

| path | resource |
|---|---|
| `POST /fhir` (transaction), `/fhir/ServiceRequest` | ServiceRequest |
| `/fhir/<Type>…` | that type (Task, DiagnosticReport, CoverageEligibilityRequest, …) |
| `/v1/cases…` | reading: Task (the case, as FHIR shows it); writing: ServiceRequest (the order) |
| `/v1/records…`, `/dicomweb/…` | ImagingStudy |
| `/v1/coverage…` | CoverageEligibilityRequest |
| `/v1/reports…` | DiagnosticReport |
| `/v1/partners/{id}/audit-events` | AuditEvent |
| anything else | `*` (only a `system/*.…` scope covers it) |

GET and HEAD need `r` (`read`), and so does the POST that mints signed links to read an instance
(`/dicomweb/…/instances/{sop}/links`); POST `c`, PUT and PATCH `u`, DELETE `d` (all three are `write`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SCOPE = re.compile(r"^system/(\*|[A-Z][A-Za-z]{0,63})\.(read|write|\*|c?r?u?d?s?)$")
V1 = {"read": "rs", "write": "cud", "*": "cruds"}
METHOD_PERMISSION = {"GET": "r", "HEAD": "r", "POST": "c", "PUT": "u", "PATCH": "u", "DELETE": "d"}
PREFIX_RESOURCE = (
    ("/v1/cases", "ServiceRequest"),  # written as the order; read as the Task (see READ_AS)
    ("/v1/records", "ImagingStudy"),
    ("/dicomweb/", "ImagingStudy"),
    ("/v1/coverage", "CoverageEligibilityRequest"),
    ("/v1/reports", "DiagnosticReport"),
)
READ_AS = {"/v1/cases": "Task"}
AUDIT_EXPORT = re.compile(r"^/v1/partners/[^/]+/audit-events$")
SIGNED_LINKS = re.compile(r"^/dicomweb/cases/[^/]+/studies/[^/]+/series/[^/]+/instances/[^/]+/links$")
FHIR_TYPE = re.compile(r"^/fhir/([A-Z][A-Za-z]{0,63})(/|$)")


class ScopeInvalid(ValueError):
    pass


@dataclass(frozen=True)
class Scope:
    resource: str  # a FHIR resource type, or "*"
    permissions: frozenset[str]  # letters of "cruds"

    def covers(self, other: Scope) -> bool:
        return self.resource in ("*", other.resource) and other.permissions <= self.permissions


def parse(scope: str) -> Scope:
    match = SCOPE.match(scope)
    if match is None or match.group(2) == "":
        raise ScopeInvalid(
            f"scope {scope[:80]!r} is not a system scope: send e.g. system/ServiceRequest.write, "
            "system/*.read or system/Task.rs"
        )
    resource, permissions = match.groups()
    return Scope(resource, frozenset(V1.get(permissions, permissions)))


def parse_all(scopes: str) -> list[Scope]:
    return [parse(s) for s in scopes.split()]


def grant(requested: str, allowed: str) -> str:
    """The requested scopes that an allowed scope covers, space separated (may be empty). Raises ScopeInvalid
    when a requested scope is not a system scope at all."""
    ceiling = parse_all(allowed)
    wanted = requested.split()
    return " ".join(s for s in dict.fromkeys(wanted) if any(a.covers(parse(s)) for a in ceiling))


def needed(method: str, path: str) -> Scope:
    """The scope a request needs: the resource its path names and the permission its method asks."""
    permission = METHOD_PERMISSION.get(method.upper(), "c")
    if SIGNED_LINKS.match(path):
        permission = "r"  # minting signed links hands out reads of one instance, nothing is written
    return Scope(resource_of(path, reading=permission == "r"), frozenset(permission))


def resource_of(path: str, reading: bool = False) -> str:
    if path in ("/fhir", "/fhir/"):
        return "ServiceRequest"  # the transaction Bundle orders a second opinion
    if match := FHIR_TYPE.match(path):
        return match.group(1)
    if AUDIT_EXPORT.match(path):
        return "AuditEvent"
    for prefix, resource in PREFIX_RESOURCE:
        if path == prefix or path.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return READ_AS.get(prefix, resource) if reading else resource
    return "*"


def name(scope: Scope) -> str:
    """How to ask for it: the v1 form (`system/Task.read`)."""
    v1 = "read" if scope.permissions <= frozenset("rs") else "write"
    return f"system/{scope.resource}.{v1}"


def permits(granted: str, method: str, path: str) -> Scope | None:
    """None when the granted scopes cover the request, else the scope it needs."""
    want = needed(method, path)
    return None if any(s.covers(want) for s in parse_all(granted)) else want
