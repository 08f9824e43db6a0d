"""The integrated report as a FHIR R4 DiagnosticReport (validated with fhir.resources' R4B models)."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from fhir.resources.R4B.diagnosticreport import DiagnosticReport

from services.review.directory import NPI_SYSTEM
from services.review.report_pdf import TITLE, Addendum, ReportContent

FHIR_JSON = "application/fhir+json"
V2_0074 = "http://terminology.hl7.org/CodeSystem/v2-0074"
LOINC = "http://loinc.org"
CASE_IDENTIFIER_SYSTEM = "urn:secondopinion:case"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"


def attachment_hash(pdf: bytes) -> str:
    """FHIR Attachment.hash: the base64 of the SHA-1 digest of the data."""
    return base64.b64encode(hashlib.sha1(pdf, usedforsecurity=False).digest()).decode()


def build_diagnostic_report(
    *, report_id: str, content: ReportContent, pdf: bytes, pdf_url: str, issued: datetime
) -> dict[str, Any]:
    """The DiagnosticReport resource as JSON, after validating it against the R4 model."""
    interpreter: dict[str, Any] = {"type": "Practitioner", "display": content.reviewer_signature}
    if content.signer.npi:
        interpreter["identifier"] = {"system": NPI_SYSTEM, "value": content.signer.npi}
    service = {"type": "Organization", "display": content.reviewer.organization}
    pdf_attachment = {
        "contentType": "application/pdf",
        "url": pdf_url,
        "size": len(pdf),
        "hash": attachment_hash(pdf),
        "title": TITLE,
        "creation": content.signed_at.isoformat(),
    }
    resource = DiagnosticReport.model_validate(
        {
            "resourceType": "DiagnosticReport",
            "id": report_id,
            # One version per issue of the report: as composed, then +1 per addendum (Report.version).
            "meta": {"versionId": str(1 + len(content.addenda)), "lastUpdated": issued.isoformat()},
            "identifier": [{"system": CASE_IDENTIFIER_SYSTEM, "value": content.case_id}],
            # FHIR R4: "corrected" once the specialist corrected what the report said (an addendum of kind
            # correction), else "appended" once anything was added to it (an answer, a finding), else "final".
            "status": report_status(content.addenda),
            "category": [{"coding": [{"system": V2_0074, "code": "RAD", "display": "Radiology"}]}],
            "code": {
                "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                "text": f"Second opinion: {content.request.exam.exam_type} ultrasound",
            },
            "subject": patient_reference(content),
            **based_on(content),
            "effectiveDateTime": content.request.exam.performed_on.isoformat(),
            # The study read, by its DICOM Study Instance UID (R4 ImagingStudy.identifier convention).
            "imagingStudy": [
                {
                    "type": "ImagingStudy",
                    "identifier": {
                        "system": "urn:dicom:uid",
                        "value": f"urn:oid:{content.request.study.study_instance_uid}",
                    },
                }
            ],
            "issued": issued.isoformat(),
            "performer": [service],
            "resultsInterpreter": [interpreter],
            "conclusion": conclusion(content),
            "presentedForm": [pdf_attachment],
        }
    )
    return json.loads(resource.model_dump_json())


def conclusion(content: ReportContent) -> str:
    """The impression, the recommendations, and who was told of a critical result or major discrepancy (a receiver
    that shows only the conclusion shows them all). Structured follow-ups are written out in words: R4 has no
    element for them, and no extension is made up."""
    lines = "\n".join(f"- {line}" for line in content.recommendations)
    text = f"{content.findings.impression}\n\nRecommendations:\n{lines}"
    statement = content.communication_statement
    return f"{text}\n\n{' '.join(statement)}" if statement else text


def based_on(content: ReportContent) -> dict[str, Any]:
    """The partner's order this report answers: intake keeps it as ServiceRequest/{case id}, and names it as its
    Task does (groupIdentifier): under its own identifier system, or the partner's namespace when it was sent
    without one."""
    request = content.request
    order: dict[str, Any] = {"reference": f"ServiceRequest/{content.case_id}", "type": "ServiceRequest"}
    if request.partner_case_ref and request.partner_id:
        order["identifier"] = {
            "system": request.partner_case_ref_system or f"urn:secondopinion:partner:{request.partner_id}",
            "value": request.partner_case_ref,
        }
    return {"basedOn": [order]}


def patient_reference(content: ReportContent) -> dict[str, Any]:
    """A logical reference by the referring facility's MRN, so the receiver can file the report."""
    patient = content.request.patient
    return {
        "type": "Patient",
        "identifier": {
            "use": "usual",
            "type": {"coding": [{"system": V2_0203, "code": "MR"}]},
            "value": patient.mrn,
            "assigner": {"display": content.request.referring.organization},
        },
        "display": content.patient_name,
    }


def operation_outcome(code: str, diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }


def report_status(addenda: Sequence[Addendum]) -> str:
    """The DiagnosticReport status (R4 diagnostic-report-status) of a report with these addenda."""
    if any(a.question is None and a.kind == "correction" for a in addenda):
        return "corrected"
    return "appended" if addenda else "final"
