"""A DICOM SR as the original report, and the exam-type view checklist, through the records API."""

from __future__ import annotations

import uuid

from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from scripts.synthetic_study import make_sr_report, make_us_instance
from tests.integration import test_records_api as records_api
from tests.integration.test_records_api import assembled_events, upload

# The records API fixtures (engine, a TestClient on the real database, a case awaiting records).
engine, client, case_id = records_api.engine, records_api.client, records_api.case_id

PELVIC_VIEWS = ["UTERUS SAG", "Uterus trans", "Endometrium", "RT OVARY", "LEFT OVARY"]


def study_uid() -> str:
    return f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"


def image(study: str, view: str | None, frames: int = 1) -> bytes:
    return make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=frames, view_label=view)


def test_a_structured_report_is_the_original_report(client: TestClient, engine: Engine, case_id: str) -> None:
    study = study_uid()
    sr = make_sr_report(
        {"Findings": "4.2 cm complex left adnexal cyst", "Impression": "Indeterminate, consider surgery"},
        study_uid=study,
    )
    images = [(f"img{i}.dcm", image(study, view), "application/dicom") for i, view in enumerate(PELVIC_VIEWS)]
    response = upload(client, case_id, ("report.dcm", sr, "application/dicom"), *images)
    assert response.status_code == 201, response.text
    assert response.json()["status"] == "assembled"
    [event] = assembled_events(engine, case_id)
    assert event.report.content_type == "application/dicom"
    assert "Findings: 4.2 cm complex left adnexal cyst" in event.report.text
    assert "Impression: Indeterminate, consider surgery" in event.report.text
    assert event.study.modality == "US" and event.study.instance_count == len(PELVIC_VIEWS)
    assert not [w for w in event.warnings if "views" in w]  # every standard pelvic view is there
    assert not [w for w in event.warnings if "not ultrasound" in w]  # the SR is the report, not a stray


def test_missing_standard_views_are_named_for_the_specialist(
    client: TestClient, engine: Engine, case_id: str
) -> None:
    study = study_uid()
    response = upload(
        client,
        case_id,
        ("report.txt", b"FINDINGS: cyst. IMPRESSION: benign.", "text/plain"),
        ("a.dcm", image(study, "UTERUS SAG"), "application/dicom"),
        ("b.dcm", image(study, "RT OVARY"), "application/dicom"),
    )
    assert response.status_code == 201, response.text
    [event] = assembled_events(engine, case_id)
    [views] = [w for w in event.warnings if "views" in w]
    assert views == "standard pelvic views not found: uterus, transverse, endometrium, left ovary"


def test_unlabelled_images_say_the_views_cannot_be_checked(
    client: TestClient, engine: Engine, case_id: str
) -> None:
    study = study_uid()
    response = upload(
        client,
        case_id,
        ("report.txt", b"FINDINGS: cyst.", "text/plain"),
        ("a.dcm", image(study, None), "application/dicom"),
    )
    assert response.status_code == 201, response.text
    [event] = assembled_events(engine, case_id)
    assert any("views cannot be checked" in w for w in event.warnings)
