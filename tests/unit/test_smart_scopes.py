"""Which SMART system scope a request needs, and what a client is granted of what it asks."""

from __future__ import annotations

import pytest

from services.auth import smart_scopes
from services.auth.smart_scopes import ScopeInvalid, grant, permits


@pytest.mark.parametrize(
    ("method", "path", "needed"),
    [
        ("POST", "/fhir", "system/ServiceRequest.write"),
        ("POST", "/fhir/ServiceRequest", "system/ServiceRequest.write"),
        ("GET", "/fhir/Task/abc", "system/Task.read"),
        ("HEAD", "/fhir/Task/abc", "system/Task.read"),
        ("GET", "/fhir/DiagnosticReport/r1", "system/DiagnosticReport.read"),
        ("POST", "/v1/cases", "system/ServiceRequest.write"),
        ("POST", "/v1/cases/c1/cancel", "system/ServiceRequest.write"),
        ("GET", "/v1/cases/c1", "system/Task.read"),
        ("GET", "/v1/records/c1", "system/ImagingStudy.read"),
        ("GET", "/dicomweb/studies/1.2", "system/ImagingStudy.read"),
        ("GET", "/v1/partners/p1/audit-events", "system/AuditEvent.read"),
        ("POST", "/v1/partners/p1/keys", "system/*.write"),
        ("GET", "/v1/casesx", "system/*.read"),  # a prefix matches whole segments only
    ],
)
def test_each_request_needs_the_scope_of_its_resource_and_method(method: str, path: str, needed: str) -> None:
    assert smart_scopes.name(smart_scopes.needed(method, path)) == needed
    assert permits(needed, method, path) is None
    assert permits("system/*.*", method, path) is None


def test_read_scopes_do_not_write_and_v2_letters_count() -> None:
    assert permits("system/*.read", "POST", "/fhir/ServiceRequest") is not None
    assert permits("system/ServiceRequest.read", "POST", "/fhir/ServiceRequest") is not None
    assert permits("system/ServiceRequest.c", "POST", "/fhir/ServiceRequest") is None
    assert permits("system/Task.rs", "GET", "/fhir/Task/1") is None
    assert permits("system/Task.s", "GET", "/fhir/Task/1") is not None  # a search scope reads no instance
    assert permits("system/ServiceRequest.write", "GET", "/fhir/Task/1") is not None


def test_granted_is_what_was_asked_and_is_allowed() -> None:
    allowed = "system/ServiceRequest.write system/*.read"
    assert grant("system/Task.read system/ServiceRequest.write system/Patient.write", allowed) == (
        "system/Task.read system/ServiceRequest.write"
    )
    assert grant("system/Task.write", allowed) == ""
    assert (
        grant("system/ServiceRequest.cud system/ServiceRequest.cud", allowed) == "system/ServiceRequest.cud"
    )
    for wrong in ("patient/*.read", "system/Task", "system/task.read", "system/Task.x", "openid"):
        with pytest.raises(ScopeInvalid):
            grant(wrong, allowed)
