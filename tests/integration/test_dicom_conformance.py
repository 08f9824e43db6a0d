"""Every DICOM object the platform writes conforms to its IOD, as David Clunie's dciodvfy (dicom3tools) checks
it, and the report and the images it sits with describe one patient and study, as dcentvfy checks them: what
a PACS that receives our report, or a teaching file system that imports our export, checks first.

One case is built once through the records service's API from a realistic study (the facility writes Latin-1,
an accented name, an accession with its issuer and longer than DICOM takes from the case; a still image, a
burned-in clip sent Implicit VR and one Deflated, as older carts write them; the first reader's SR), and the
review service's report is stored into it. Each object is then validated as someone receives it:

    the report as the review service issues it        encapsulated_pdf.py
    the report as stored: the copy sent back to the facility's PACS (report_study.py, report_return.py)
    the report (the review's DICOM download serves these bytes), images and SR handed out: download, WADO-RS
    the de-identified export's instances and its DICOMDIR    export.py, deidentify.py

The inputs are checked too, so a finding is ours, not the test factory's. About 3 s: each object is built once.
"""

from __future__ import annotations

import base64
import email.parser
import email.policy
import io
import json
import shutil
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, date, datetime
from pathlib import Path

import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import new_event
from contracts.events import EncapsulatedReport
from scripts.synthetic_study import make_sr_report
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.http import create_app
from services.records import api, consumer, dicomweb, export
from services.records.report_study import stored_report
from services.records.store import ObjectStore
from services.review.encapsulated_pdf import encapsulated_pdf
from tests.dicom_factory import make_pdf_report, make_us_instance
from tests.integration.test_records_dicomweb import open_case
from tests.keys import operations_headers
from tests.unit.test_review_matching import request as match_request

# The facility's accession as its RIS issues it: longer than DICOM's 16 characters (SH), which the case API
# takes (up to 64), so it cannot be written into Accession Number as it is.
FACILITY_ACCESSION = "BAYVIEW-RIS-2026-000042"
IMAGE_ACCESSION = "RIS0042"  # what the modality wrote (from its worklist)

# Warnings dciodvfy may give that a PACS administrator need not act on, each with why:
ALLOWED_WARNINGS = {
    # The report as the review service issues it: intake knows no Study Time or Study ID of the facility's
    # study, so these Type 2 attributes are empty (valid); records fills them from the images when it places
    # the report, and the de-identified export gives them dummies (its DICOMDIR needs them).
    "report as issued": (
        "Missing attribute or value that would be needed to build DICOMDIR - Study Time",
        "Missing attribute or value that would be needed to build DICOMDIR - Study ID",
    ),
}


# dcentvfy's, across instances: its tables put Accession Number (and its issuer) in the Series IE of an SR
# and the Study IE of an image, so it warns on any SR beside images (the facility's own SR and images too);
# it compares values within one IE only, and the values are the same.
ALLOWED_ACROSS = tuple(
    f"Warning - Different information entities for attribute - Element=<{keyword}>"
    for keyword in ("AccessionNumber", "IssuerOfAccessionNumberSequence")
)


def dciodvfy() -> str:
    found = shutil.which("dciodvfy")
    if found is None:
        pytest.fail("dciodvfy is missing: apt-get install dicom3tools (.ci/run installs it)")
    return found


def findings(tool: str, *paths: Path) -> list[str]:
    """The tool's Error and Warning lines (on stderr; dciodvfy names the IOD on stdout)."""
    run = subprocess.run(
        [tool, *map(str, paths)], capture_output=True, text=True, errors="replace", timeout=30
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith(("Error", "Warning"))]


def as_the_facility_wrote_it(dataset: Dataset) -> None:
    """The patient and study as the facility's modality and RIS wrote them (Latin-1, an accession with its
    issuer, the patient's age at the study), the same on every instance of the study."""
    dataset.SpecificCharacterSet = "ISO_IR 100"
    dataset.PatientName = "DOÉ^JANE^MARIE"
    dataset.IssuerOfPatientID = "BAYVIEW"
    dataset.PatientAge = "046Y"
    dataset.StudyTime, dataset.StudyID = "093000", "US77"
    dataset.AccessionNumber = IMAGE_ACCESSION
    issuer = Dataset()
    issuer.LocalNamespaceEntityID = "BAYVIEW-RIS"
    dataset.IssuerOfAccessionNumberSequence = Sequence([issuer])
    dataset.ReferringPhysicianName = "HOUSE^GREGORY"
    dataset.StudyDescription = "US PELVIS TRANSVAGINAL"


def encoded(dataset: Dataset) -> bytes:
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def realistic_ultrasound(study: str, *, frames: int, syntax: pydicom.uid.UID) -> bytes:
    """What a cart writes: the facility's study identity, equipment, burned-in text on a calibrated region."""
    dataset = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(
                None,
                study_uid=study,
                series_uid=f"{study}.{frames}",
                frames=frames,
                burned_in_annotation="YES",
            )
        )
    )
    as_the_facility_wrote_it(dataset)
    dataset.InstanceNumber = frames
    dataset.SeriesDescription = "Pelvis"
    dataset.ContentDate, dataset.ContentTime = "20261120", "093512"
    dataset.AcquisitionDateTime = "20261120093512"
    dataset.InstitutionName, dataset.StationName = "Bayview Imaging", "US-ROOM-2"
    dataset.ManufacturerModelName, dataset.DeviceSerialNumber = "Voluson E10", "SN12345"
    dataset.OperatorsName, dataset.PerformingPhysicianName = "SMITH^ANNA", "JONES^BOB"
    dataset.TransducerData = "RIC5-9-D"
    dataset.ImageComments = "RT OVARY"
    dataset.file_meta.TransferSyntaxUID = syntax
    return encoded(dataset)


def first_report(study: str) -> bytes:
    """The first reader's report as the facility's RIS wrote it: a Basic Text SR in the same study."""
    sections = {"Findings": "4.2 cm complex left adnexal cyst", "Impression": "Indeterminate"}
    dataset = pydicom.dcmread(io.BytesIO(make_sr_report(sections, study_uid=study)))
    as_the_facility_wrote_it(dataset)
    return encoded(dataset)


def issue_report(case_id: str, study: str) -> bytes:
    """The review service's Encapsulated PDF for the case, as it issues it."""
    base = match_request("pelvic", "CA")
    match = base.model_copy(
        update={
            "case_id": case_id,
            "exam": base.exam.model_copy(
                update={"performed_on": date(2026, 11, 20), "accession_number": FACILITY_ACCESSION}
            ),
            "patient": base.patient.model_copy(update={"mrn": "MRN1"}),
            "study": base.study.model_copy(update={"study_instance_uid": study}),
        }
    )
    return encapsulated_pdf(
        pdf=make_pdf_report("Second opinion\nImpression: benign-appearing cyst."),
        request=match,
        report_id=str(uuid.uuid4()),
        version=1,
        issued=datetime(2026, 12, 1, 14, 30, tzinfo=UTC),
    )


def store_report(engine: Engine, settings: Settings, case_id: str, issued: bytes) -> bytes:
    """The review service's report through the records consumer; the copy records stored, placed into the
    study, which is the one it sends back to the facility's PACS (report_return.py reads it as stored)."""
    uid = str(pydicom.dcmread(io.BytesIO(issued), stop_before_pixels=True).SOPInstanceUID)
    event = EncapsulatedReport(
        case_id=case_id,
        report_id="r",
        version=1,
        sop_instance_uid=uid,
        dicom_base64=base64.b64encode(issued).decode(),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=event, subject=case_id), settings
        )
        session.commit()
    with Session(engine) as session:
        found = stored_report(session, case_id, uid)
    assert found is not None
    row, _ = found
    return ObjectStore.for_settings(settings).local_path(row.storage_path, row.sha256).read_bytes()


def wado_instance(http: TestClient, url: str) -> bytes:
    response = http.get(url, headers={"Accept": 'multipart/related; type="application/dicom"'})
    assert response.status_code == 200, response.text
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + response.headers["content-type"].encode() + b"\r\n\r\n" + response.content
    )
    [part] = list(message.iter_parts())
    payload = part.get_payload(decode=True)
    assert isinstance(payload, bytes)
    return payload


@pytest.fixture(scope="module")
def written(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each DICOM object the platform writes for one case, by what it is, as files."""
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app(
        "records",
        routers=[api.router, export.router, dicomweb.router],
        engine=lambda: engine,
        max_body_bytes=None,
    )
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    folder = tmp_path_factory.mktemp("written")
    objects: dict[str, bytes] = {}
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    with TestClient(app, headers=operations_headers(settings)) as http:
        case_id = open_case(engine, settings, study, FACILITY_ACCESSION)
        image = realistic_ultrasound(study, frames=1, syntax=pydicom.uid.ExplicitVRLittleEndian)
        clip = realistic_ultrasound(study, frames=3, syntax=pydicom.uid.ImplicitVRLittleEndian)
        # An older cart's deflated clip (dciodvfy reads no deflated file: the input is checked as the clip is).
        deflated = realistic_ultrasound(study, frames=2, syntax=pydicom.uid.DeflatedExplicitVRLittleEndian)
        sr = first_report(study)
        objects |= {"input image": image, "input clip": clip, "input first report (SR)": sr}
        uploaded = http.post(
            f"/v1/records/{case_id}/files",
            files=[
                ("files", (f"{n}.dcm", data, "application/dicom"))
                for n, data in enumerate((image, clip, deflated, sr))
            ],
        )
        assert uploaded.status_code == 201, uploaded.text
        files = http.get(f"/v1/records/{case_id}").json()["files"]
        assert len(files) == 4, files

        issued = issue_report(case_id, study)
        objects["report as issued"] = issued
        issued_uid = str(pydicom.dcmread(io.BytesIO(issued), stop_before_pixels=True).SOPInstanceUID)
        objects["report as returned to the PACS"] = store_report(engine, settings, case_id, issued)
        handed = http.get(f"/v1/records/{case_id}/second-opinion/{issued_uid}")
        assert handed.status_code == 200, handed.text
        objects["report handed out"] = handed.content

        handed_out: dict[tuple[str, int], bytes] = {}
        for f in files:
            data = http.get(f"/v1/records/{case_id}/files/{f['sha256']}")
            assert data.status_code == 200, data.text  # released: the images are the case's patient's
            handed_out[f["modality"], f["number_of_frames"] or 1] = data.content
        objects["image handed out"], objects["clip handed out"] = handed_out["US", 1], handed_out["US", 3]
        objects["first report (SR) handed out"] = handed_out["SR", 1]
        objects["clip handed out by WADO-RS"] = wado_instance(
            http,
            f"/dicomweb/cases/{case_id}/studies/{study}/series/{study}.3/instances/"
            f"{pydicom.dcmread(io.BytesIO(clip), stop_before_pixels=True).SOPInstanceUID}",
        )

        exported = http.get(f"/v1/records/{case_id}/export/deidentified")
        assert exported.status_code == 200, exported.text
        with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
            assert len(archive.namelist()) == 5  # the three images, cleaned, DICOMDIR and the manifest
            manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
            # The first reader's SR and our report are left out as what they are: documents, not images.
            assert [(r["code"], r["count"]) for r in manifest["withheld_reasons"]] == [("document", 2)]
            for name in archive.namelist():
                if name != "DEIDENTIFICATION.json":
                    objects[f"export {name}"] = archive.read(name)
    paths = {}
    for n, (name, content) in enumerate(objects.items()):
        paths[name] = folder / f"{n}.dcm"
        paths[name].write_bytes(content)
    return paths


OBJECTS = [
    "input image",
    "input clip",
    "input first report (SR)",
    "report as issued",
    "report as returned to the PACS",
    "report handed out",
    "image handed out",
    "clip handed out",
    "clip handed out by WADO-RS",
    "first report (SR) handed out",
    "export DICOMDIR",
    "export instances",
]


def named(written: dict[str, Path], what: str) -> list[Path]:
    if what == "export instances":
        return [
            path for name, path in written.items() if name.startswith("export ") and name != "export DICOMDIR"
        ]
    return [written[what]]


@pytest.mark.parametrize("what", OBJECTS)
def test_what_the_platform_writes_conforms_to_its_iod(written: dict[str, Path], what: str) -> None:
    paths = named(written, what)
    assert paths, sorted(written)
    allowed = ALLOWED_WARNINGS.get(what, ())
    for path in paths:
        found = [
            line
            for line in findings(dciodvfy(), path)
            if line.startswith("Error") or not line.endswith(allowed)
        ]
        assert found == [], f"{what}: {found}"


@pytest.mark.parametrize(
    "domain",
    [
        (
            "input image",
            "input clip",
            "report as returned to the PACS",
        ),  # what the facility's PACS then holds
        (
            "image handed out",
            "clip handed out",
            "first report (SR) handed out",
            "report handed out",
        ),  # a viewer's
        ("export instances",),  # what a teaching file system imports
    ],
    ids=["facility", "ours", "export"],
)
def test_the_report_and_the_images_describe_one_patient_and_study(
    written: dict[str, Path], domain: tuple[str, ...]
) -> None:
    """dcentvfy (dicom3tools) compares the Patient, Study and Series attributes across instances: a PACS files
    a study by them, and one that differs between the report and the images splits or relabels the study."""
    dcentvfy = shutil.which("dcentvfy")
    assert dcentvfy is not None, "dcentvfy is missing: apt-get install dicom3tools"
    found = findings(dcentvfy, *(path for what in domain for path in named(written, what)))
    assert [line for line in found if not line.startswith(ALLOWED_ACROSS)] == []
