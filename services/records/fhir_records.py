"""Other records sent as FHIR R4 JSON: a DiagnosticReport (the original report), an Observation (a lab
result) or a DocumentReference (clinical notes, pathology). Validated with `fhir.resources` (R4B models);
each carries its date for the case's timeline."""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from contracts.validation import fields_of

FHIR_TYPE = "application/fhir+json"
MAX_FHIR_BYTES = 20 * 1024 * 1024
SUPPORTED = ("DiagnosticReport", "Observation", "DocumentReference")


class NotFhir(Exception):
    """The JSON is not one of the FHIR resources we take."""


class NotJson(Exception):
    """Text that only starts like JSON: a text report, not a record."""


class InvalidFhir(Exception):
    """Phrased to follow "file 3 of 5"."""


@dataclass(frozen=True)
class FhirRecord:
    resource_type: str
    record_date: date | None


def looks_like_json(head: bytes) -> bool:
    return head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"{")


def read_fhir(path: Path, size: int) -> FhirRecord:
    if size > MAX_FHIR_BYTES:
        raise InvalidFhir("is a JSON file larger than 20 MiB; send attachments as PDF files instead")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise NotJson() from None
    if not isinstance(data, dict) or data.get("resourceType") not in SUPPORTED:
        raise NotFhir()
    resource_type = str(data["resourceType"])
    try:
        resource = _model(resource_type).model_validate(data)
    except ValidationError as exc:
        fields = fields_of(exc, most=5)
        raise InvalidFhir(f"is a FHIR {resource_type} that does not validate (fields: {fields})") from None
    return FhirRecord(resource_type, _record_date(resource))


def _model(resource_type: str) -> Any:
    if resource_type == "DiagnosticReport":
        from fhir.resources.R4B.diagnosticreport import DiagnosticReport

        return DiagnosticReport
    if resource_type == "Observation":
        from fhir.resources.R4B.observation import Observation

        return Observation
    from fhir.resources.R4B.documentreference import DocumentReference

    return DocumentReference


def _record_date(resource: Any) -> date | None:
    for name in ("effectiveDateTime", "issued", "date"):
        value = getattr(resource, name, None)
        if isinstance(value, datetime):
            return value.date()
        if isinstance(value, date):
            return value
        if isinstance(value, str) and re.match(r"^\d{4}-\d{2}-\d{2}", value):
            return date.fromisoformat(value[:10])
    return None


def diagnostic_report_text(path: Path) -> str:
    """The report's words: its conclusion, its narrative, and any text/plain presented form."""
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    parts = [str(data.get("conclusion") or "")]
    narrative = (data.get("text") or {}).get("div") or ""
    parts.append(re.sub(r"<[^>]+>", " ", narrative))
    for form in data.get("presentedForm") or []:
        if str(form.get("contentType", "")).startswith("text/plain") and form.get("data"):
            parts.append(base64.b64decode(form["data"]).decode("utf-8", errors="replace"))
    return "\n".join(" ".join(p.split()) for p in parts if p.strip())
