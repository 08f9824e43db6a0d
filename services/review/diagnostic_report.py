"""The integrated report as a FHIR R4 DiagnosticReport (validated with fhir.resources' R4B models)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from fhir.resources.R4B.documentreference import DocumentReference

from services.review.report_pdf import TITLE, ReportContent

FHIR_JSON = "application/fhir+json"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
LOINC = "http://loinc.org"
CASE_IDENTIFIER_SYSTEM = "urn:secondopinion:case"
# R4 has no DiagnosticReport element that points at a DocumentReference; this extension names the contained
# one that describes the PDF (and satisfies dom-3: a contained resource must be referenced).
REPORT_DOCUMENT_EXTENSION = "urn:secondopinion:fhir:report-document"


def attachment_hash(pdf: bytes) -> str:
    """FHIR Attachment.hash: the base64 of the SHA-1 digest of the data."""
    return base64.b64encode(hashlib.sha1(pdf, usedforsecurity=False).digest()).decode()


def build_diagnostic_report(
    *, report_id: str, content: ReportContent, pdf: bytes, pdf_url: str, issued: datetime
) -> dict[str, Any]:
    """The DiagnosticReport resource as JSON, after validating it against the R4 model."""
    reviewer = {"display": f"{content.reviewer_signature}, {content.reviewer.organization}"}
    pdf_attachment = {
        "contentType": "application/pdf",
        "url": pdf_url,
        "size": len(pdf),
        "hash": attachment_hash(pdf),
        "title": TITLE,
        "creation": content.signed_at.isoformat(),
    }
    document = DocumentReference.model_validate(
        {
            "resourceType": "DocumentReference",
            "id": "pdf",
            "status": "current",
            "docStatus": "amended" if content.addenda else "final",
            "type": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}]},
            "subject": {"display": content.patient_name},
            "date": issued.isoformat(),
            "author": [reviewer],
            "content": [{"attachment": pdf_attachment}],
        }
    )
    resource = DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "id": report_id,
            "contained": [json.loads(document.model_dump_json())],
            "extension": [{"url": REPORT_DOCUMENT_EXTENSION, "valueReference": {"reference": "#pdf"}}],
            "identifier": [{"system": CASE_IDENTIFIER_SYSTEM, "value": content.case_id}],
            # FHIR R4: "appended" = subsequent to being final, the report has been added to (an addendum).
            "status": "appended" if content.addenda else "final",
            "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
            "code": {
                "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                "text": f"Second opinion: {content.request.exam.exam_type} ultrasound",
            },
            "subject": {"display": content.patient_name},
            "effectiveDateTime": content.request.exam.performed_on.isoformat(),
            "issued": issued.isoformat(),
            "performer": [reviewer],
            "resultsInterpreter": [reviewer],
            "conclusion": content.findings.impression,
            "presentedForm": [pdf_attachment],
        }
    )
    return json.loads(resource.model_dump_json())


def operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
