"""The FHIR AuditEvent of a DICOMweb read names the study it read as an entity (IHE ATNA "DICOM Instances
Accessed"), not only in free text (services.auth.fhir_audit)."""

from services.auth.fhir_audit import to_fhir
from services.auth.models import AuditEvent


def entry(resource: str, detail: str) -> AuditEvent:
    return AuditEvent(
        id=7,
        actor="key:abc",
        partner_id=None,
        role="specialist",
        service="records",
        action="read",
        resource=resource,
        case_id="3f2c9a4e-0000-4000-8000-000000000001",
        outcome="success",
        detail=detail,
    )


def test_a_dicomweb_instance_read_names_its_study_series_and_instance() -> None:
    read = entry("records.dicomweb", "study 1.2.3 series 1.2.3.1 instance 1.2.3.1.9; further reads ...")
    case, study = to_fhir(read)["entity"]
    assert case["what"]["identifier"]["value"] == read.case_id
    assert study["what"]["identifier"] == {"system": "urn:dicom:uid", "value": "urn:oid:1.2.3"}
    assert study["type"]["code"] == "110180"
    assert study["detail"] == [
        {"type": "Series Instance UID", "valueString": "1.2.3.1"},
        {"type": "SOP Instance UID", "valueString": "1.2.3.1.9"},
    ]


def test_other_entries_name_only_the_case() -> None:
    assert len(to_fhir(entry("records.dicomweb", ""))["entity"]) == 1
    assert len(to_fhir(entry("case", "study 1.2.3"))["entity"]) == 1
