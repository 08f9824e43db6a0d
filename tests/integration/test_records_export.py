"""De-identified export of a case's released images (PS3.15 Annex E basic profile) through the API."""

import datetime
import io
import json
import re
import subprocess
import uuid
import zipfile
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import numpy as np
import pydicom
import pydicom.encaps
import pytest
from dicomanonymizer.dicomfields_selector import dicom_anonymization_database_selector
from fastapi.testclient import TestClient
from PIL import Image
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy.engine import Engine
from sqlmodel import Session

from contracts import CollectRecords, Exam, Patient, new_event
from services.common import migrate
from services.common.config import Settings, get_settings
from services.common.db import make_engine
from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.common.http import create_app
from services.records import api, consumer, deidentify, export
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.keys import operations_headers

PHI = (b"DOE", b"JANE", b"MRN1", b"19800101", b"ACC-EXPORT-1")


def phi_found(data: bytes) -> list[bytes]:
    """The PHI values found in a PS3.10 file's bytes, leaving out its pixel data and its UIDs. The test
    images' pixels are random bytes, and the UIDs the export makes are random digits: 8 KB of pixels hold
    "DOE" about once in 5,000 files, and an export's UIDs held "19800101" once in 150 (a CI run found one).
    Text burned into pixels is checked as pixels, and the original UIDs as markers, by the tests here."""
    ds = pydicom.dcmread(io.BytesIO(data), force=True)
    random = [ds.PixelData] if "PixelData" in ds else []
    for element in ds.iterall():
        if element.VR == "UI" and element.value:
            values = element.value if element.VM > 1 else [element.value]
            random += [str(value).encode() for value in values]
    for value in random:
        data = data.replace(value, b"|")  # a separator: two neighbours do not join into a new string
    return [value for value in PHI if value in data]


@pytest.fixture(scope="module")
def client(settings: Settings) -> Iterator[tuple[TestClient, Engine]]:
    engine = make_engine("records", settings)
    migrate.upgrade("records", engine)

    def session() -> Iterator[Session]:
        with Session(engine, expire_on_commit=False) as s:
            yield s

    app = create_app(
        "records", routers=[api.router, export.router], engine=lambda: engine, max_body_bytes=None
    )
    app.dependency_overrides[api.get_session] = session
    app.dependency_overrides[get_settings] = lambda: settings
    with TestClient(app, headers=operations_headers(settings)) as c:
        yield c, engine


def records_requested(engine: Engine, settings: Settings) -> str:
    """A case whose records were requested for DOE^JANE, MRN1, born 1980-01-01; its id."""
    case_id = str(uuid.uuid4())
    command = CollectRecords(
        case_id=case_id,
        patient=Patient(
            family_name="Doe",
            given_name="Jane",
            birth_date=date(1980, 1, 1),
            sex="female",
            mrn="MRN1",
            state="CA",
        ),
        exam=Exam(exam_type="pelvic", performed_on=date(2026, 11, 20), facility="Bayview"),
    )
    with Session(engine) as session:
        consumer.handle(
            session, new_event(id=str(uuid.uuid4()), source="/t", data=command, subject=case_id), settings
        )
        session.commit()
    return case_id


def test_the_export_removes_identity_keeps_pixels_and_withholds_burned_in_images(
    client: tuple[TestClient, Engine], settings: Settings
) -> None:
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    clean = make_us_instance(
        None, study_uid=study, series_uid=study + ".1", frames=3, accession_number="ACC-EXPORT-1"
    )
    burned = make_us_instance(  # no ultrasound regions: nothing says where text may be
        None, study_uid=study, series_uid=study + ".1", burned_in_annotation="YES", calibrated=False
    )
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[
            ("files", ("a.dcm", clean, "application/dicom")),
            ("files", ("b.dcm", burned, "application/dicom")),
        ],
    )
    assert response.status_code == 201, response.text

    anonymous = http.get(f"/v1/records/{case_id}/export/deidentified", headers={"Authorization": ""})
    assert anonymous.status_code == 401  # no key, no images
    exported = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert exported.status_code == 200 and exported.headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        names = archive.namelist()
        manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
        [instance_name] = [n for n in names if n not in ("DICOMDIR", "DEIDENTIFICATION.json")]
        dicomdir = pydicom.dcmread(io.BytesIO(archive.read("DICOMDIR")))
    # IHE PDI / PS3.10: a DICOMDIR at the root whose file IDs name the instances (8 chars, no extension)
    [referenced] = [r.ReferencedFileID for r in dicomdir.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert "/".join(referenced) == instance_name
    assert all(re.fullmatch(r"[A-Z0-9_]{1,8}", part) for part in referenced)
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        data = archive.read(instance_name)
    assert (manifest["exported"], manifest["withheld"]) == (1, 1)
    assert [(r["code"], r["count"]) for r in manifest["withheld_reasons"]] == [("no_ultrasound_regions", 1)]
    assert manifest["withheld_reason"] == manifest["withheld_reasons"][0]["reason"]  # the key readers had
    assert manifest["method_codes"][0]["code_value"] == "113100"
    assert phi_found(data) == []
    ds, original = pydicom.dcmread(io.BytesIO(data)), pydicom.dcmread(io.BytesIO(clean))
    assert ds.PatientIdentityRemoved == "YES"
    assert (ds.file_meta.ImplementationClassUID, ds.file_meta.ImplementationVersionName) == (
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
    )  # we wrote it, not the modality: its meta names our implementation
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.StudyInstanceUID != study and ds.SOPInstanceUID != original.SOPInstanceUID
    assert ds.PixelData == original.PixelData and ds.NumberOfFrames == 3
    assert "SequenceOfUltrasoundRegions" in ds  # calibration is not identity: kept for teaching
    assert list(ObjectStore.for_settings(settings).tmp_dir.glob("export-*")) == []  # removed after sending


def table_e_1_1() -> dict[int, str]:
    """PS3.15 Table E.1-1's Basic Profile column (2026c), read here as the module reads it, not from it."""
    database = dicom_anonymization_database_selector("dicomfields_2026c")
    return {
        (tag[0] << 16) | tag[1]: category.removesuffix("_TAGS").replace("_STAR", "*").replace("_", "/")
        for category, tags in database.items()
        if category != "ALL_TAGS"
        for tag in tags
        if len(tag) == 2
    }


def _marker(index: int, vr: str) -> tuple[object, bytes] | None:
    """A value of `vr` recognisable in the file's bytes (unique per index), or None for a binary number."""
    text: str
    if vr in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"):
        text = f"MKR{index:04d}"
    elif vr == "DA":
        text = (datetime.date(1850, 1, 1) + datetime.timedelta(days=index)).strftime("%Y%m%d")
    elif vr == "TM":
        text = f"{index // 60 % 24:02d}{index % 60:02d}07.987{index:03d}"
    elif vr == "DT":
        text = f"18500101{index // 60 % 24:02d}{index % 60:02d}07.987{index:03d}"
    elif vr == "AS":
        text = f"{index % 1000:03d}W"
    elif vr == "DS":
        text = f"-9{index:04d}.25"
    elif vr == "IS":
        text = f"-7{index:04d}"
    elif vr == "UI":
        text = f"1.2.999.{1000 + index}.777"
    elif vr == "UR":
        text = f"urn:mkr{index:04d}"
    elif vr in ("OB", "UN"):
        return f"MKRB{index:04d}".encode(), f"MKRB{index:04d}".encode()
    elif vr == "SQ":
        item = Dataset()
        item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"
        item.ReferencedSOPInstanceUID = f"1.2.999.{1000 + index}.777"
        item.CodeMeaning = f"MKR{index:04d}"
        return Sequence([item]), f"1.2.999.{1000 + index}.777".encode()
    else:
        return None  # US, SS, ...: two bytes, not recognisable in a file
    return text, text.encode()


def instance_carrying_every_profile_attribute(study: str) -> tuple[bytes, dict[str, tuple[bytes, str]]]:
    """An ultrasound clip with a marker value in each attribute Table E.1-1 names whose VR can carry one,
    one curve and one overlay, an issuer of each identifier, and equipment that contributed to it (a
    sequence the table does not name, whose items carry attributes it does); its markers by where they
    were put, each with the profile's action there."""
    original = pydicom.dcmread(
        io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=2))
    )
    markers: dict[str, tuple[bytes, str]] = {}
    identity = {"PatientName", "PatientID", "PatientBirthDate", "PatientSex", "SOPInstanceUID"}
    identity |= {"StudyInstanceUID", "SeriesInstanceUID", "MediaStorageSOPInstanceUID"}
    other_iods = {"EncapsulatedDocument", "RTPlanLabel"}  # they make an instance a document or a plan
    for index, (tag, action) in enumerate(sorted(table_e_1_1().items())):
        keyword = keyword_for_tag(tag)
        if tag >> 16 in (0x0000, 0x0002) or keyword in identity | other_iods:
            continue  # commands and file meta are not in an instance; the case's identity is checked as PHI
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue  # newer than pydicom's dictionary
        made = _marker(index, vr.split(" or ")[0])
        if made is None:
            continue
        value, needle = made
        original.add_new(tag, vr.split(" or ")[0], value)
        markers[keyword or f"{tag:08X}"] = (needle, action)
    original.add_new(0x50000030, "SH", "MKRC0001")  # Curve Description
    original.add_new(0x60004000, "LT", "MKRO0001")  # Overlay Comments
    markers.update({"CurveDescription": (b"MKRC0001", "X"), "OverlayComments": (b"MKRO0001", "X")})
    original.private_block(0x0009, "ACME US", create=True).add_new(0x01, "LO", "MKRP0001")
    markers["private"] = (b"MKRP0001", "X")
    issuer = Dataset()
    issuer.LocalNamespaceEntityID, issuer.UniversalEntityID = "MKRI0001", "1.2.999.9001.777"
    original.IssuerOfPatientIDQualifiersSequence = Sequence([issuer])
    accession_issuer = Dataset()
    accession_issuer.LocalNamespaceEntityID = "MKRI0002"
    original.IssuerOfAccessionNumberSequence = Sequence([accession_issuer])
    markers["IssuerOfPatientIDQualifiersSequence"] = (b"MKRI0001", "X")
    markers["IssuerOfPatientIDQualifiersSequence.UniversalEntityID"] = (b"1.2.999.9001.777", "X")
    markers["IssuerOfAccessionNumberSequence"] = (b"MKRI0002", "X")
    contributor = Dataset()
    contributor.Manufacturer = "ACME"
    contributor.InstitutionName, contributor.StationName = "MKRN0001", "MKRN0002"
    contributor.OperatorsName, contributor.ContributionDateTime = "MKRN0003", "18600101101010.987001"
    original.ContributingEquipmentSequence = Sequence([contributor])
    markers.update({f"ContributingEquipmentSequence.{n}": (f"MKRN000{n}".encode(), "X") for n in (1, 2, 3)})
    markers["ContributingEquipmentSequence.ContributionDateTime"] = (b"18600101101010.987001", "X")
    original.preamble = b"MKRPREAM".ljust(128, b"\0")  # a dual-personality file's own header
    markers["preamble"] = (b"MKRPREAM", "X")
    buffer = io.BytesIO()
    original.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), markers


def test_no_value_the_profile_names_survives_the_export_and_dcmdump_reads_it(
    client: tuple[TestClient, Engine], settings: Settings, tmp_path: Path
) -> None:
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    data, markers = instance_carrying_every_profile_attribute(study)
    assert len(markers) > 500  # the table's attributes, not a hand-picked few
    assert set(phi_found(data)) >= {b"DOE", b"JANE", b"MRN1", b"19800101"}  # the check sees the original's
    response = http.post(
        f"/v1/records/{case_id}/files", files=[("files", ("a.dcm", data, "application/dicom"))]
    )
    assert response.status_code == 201, response.text

    exported = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert exported.status_code == 200, exported.text
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        [name] = [n for n in archive.namelist() if n not in ("DICOMDIR", "DEIDENTIFICATION.json")]
        instance = archive.read(name)
        dicomdir = archive.read("DICOMDIR")
    survivors = {
        where: action
        for where, (needle, action) in markers.items()
        if action != "K" and (needle in instance or needle in dicomdir)
    }
    assert survivors == {}
    assert phi_found(instance) == [] and phi_found(dicomdir) == []
    path = tmp_path / "exported.dcm"
    path.write_bytes(instance)
    dump = subprocess.run(["dcmdump", "-q", str(path)], capture_output=True, text=True, timeout=30)
    assert dump.returncode == 0 and "E:" not in dump.stderr, dump.stderr
    assert "(0012,0062) CS [YES]" in dump.stdout and "(0028,0008) IS [2]" in dump.stdout
    exported_instance, original = pydicom.dcmread(path), pydicom.dcmread(io.BytesIO(data))
    assert exported_instance.PixelData == original.PixelData  # copied as bytes
    assert exported_instance.ContributingEquipmentSequence[0].Manufacturer == "ACME"  # cleaned, not dropped


def clip_with_text_above_its_region(study: str, frames: int = 3) -> tuple[bytes, Dataset]:
    """An 8-bit clip whose scanner wrote text (255s) in the top rows of every frame, above the region."""
    clip = pydicom.dcmread(
        io.BytesIO(
            make_us_instance(
                None, study_uid=study, series_uid=study + ".1", frames=frames, burned_in_annotation="YES"
            )
        )
    )
    region = clip.SequenceOfUltrasoundRegions[0]
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 8, 16
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = 55, 63
    pixels = np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(frames, 64, 64).copy()
    pixels[:, 2:12, 4:60] = 255  # "DOE^JANE 2026-11-20" burned in
    clip.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    clip.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue(), clip


def test_burned_in_text_outside_the_ultrasound_regions_is_blanked_frame_by_frame(
    client: tuple[TestClient, Engine], settings: Settings
) -> None:
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    data, clip = clip_with_text_above_its_region(study)
    compressed = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".2")))
    compressed.BurnedInAnnotation = "YES"
    compressed.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    compressed.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xdbframe\xff\xd9"])
    compressed["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    compressed.save_as(buffer, enforce_file_format=True)
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[
            ("files", ("clip.dcm", data, "application/dicom")),
            ("files", ("jpeg.dcm", buffer.getvalue(), "application/dicom")),
        ],
    )
    assert response.status_code == 201, response.text

    exported = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert exported.status_code == 200, exported.text
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
        [name] = [n for n in archive.namelist() if n not in ("DICOMDIR", "DEIDENTIFICATION.json")]
        ds = pydicom.dcmread(io.BytesIO(archive.read(name)))
    assert (manifest["exported"], manifest["pixels_cleaned"], manifest["withheld"]) == (1, 1, 1)
    # Not JPEG at all: its pixel data does not decode (real JPEG is decoded and cleaned, tested below).
    assert [(r["code"], r["count"]) for r in manifest["withheld_reasons"]] == [("pixel_data_not_decoded", 1)]
    assert [c["code_value"] for c in manifest["method_codes"]] == ["113100", "113101"]
    assert ds.BurnedInAnnotation == "NO"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113101"]
    before = np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(3, 64, 64)
    after = np.frombuffer(ds.PixelData, dtype=np.uint8).reshape(3, 64, 64)
    inside = (slice(None), slice(16, 64), slice(8, 56))
    assert (after[inside] == before[inside]).all()  # the image itself untouched, in every frame
    outside = np.ones((64, 64), dtype=bool)
    outside[16:64, 8:56] = False
    assert (after[:, outside] == 0).all() and (before[:, outside] == 255).any()  # the text gone


def clip_in_fragments_said_uncompressed(study: str, *, undefined_length: bool) -> bytes:
    """A clip with text burned in whose file says Explicit VR Little Endian (uncompressed) but whose Pixel
    Data holds fragments, as some converters write it: of undefined length (items up to a sequence
    delimiter), or of a defined length the fragments' item headers make longer than the frames."""
    _, clip = clip_with_text_above_its_region(study)
    fragments = pydicom.encaps.encapsulate([clip.PixelData])
    clip.PixelData = fragments
    clip["PixelData"].VR = "OB"
    buffer = io.BytesIO()
    clip.save_as(buffer, enforce_file_format=True)
    defined = buffer.getvalue()
    if not undefined_length:
        return defined
    element = b"\xe0\x7f\x10\x00OB\x00\x00" + len(fragments).to_bytes(4, "little")
    assert defined.endswith(element + fragments)
    before = defined[: -len(element + fragments)]
    return before + element[:8] + b"\xff\xff\xff\xff" + fragments + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def test_pixel_data_in_fragments_under_an_uncompressed_syntax_is_withheld_from_its_header(
    client: tuple[TestClient, Engine], settings: Settings
) -> None:
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    data, _ = clip_with_text_above_its_region(study)
    undefined = clip_in_fragments_said_uncompressed(study, undefined_length=True)
    defined = clip_in_fragments_said_uncompressed(study, undefined_length=False)
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[
            ("files", ("clip.dcm", data, "application/dicom")),
            ("files", ("undefined.dcm", undefined, "application/dicom")),
            ("files", ("defined.dcm", defined, "application/dicom")),
        ],
    )
    assert response.status_code == 201, response.text
    assert response.json()["new_files"] == 3

    exported = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert exported.status_code == 200, exported.text
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        assert archive.testzip() is None
        manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
        names = [n for n in archive.namelist() if n not in ("DICOMDIR", "DEIDENTIFICATION.json")]
    assert (manifest["exported"], manifest["pixels_cleaned"], manifest["withheld"]) == (1, 1, 2)
    assert [(r["code"], r["count"]) for r in manifest["withheld_reasons"]] == [("pixel_data_not_native", 2)]
    assert "encapsulated in fragments" in manifest["withheld_reasons"][0]["reason"]
    assert len(names) == 1


def test_an_image_failing_midway_gives_a_clear_error_before_any_byte_never_half_a_zip(
    client: tuple[TestClient, Engine], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    images = [make_us_instance(None, study_uid=study, series_uid=study + ".1") for _ in range(2)]
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[("files", (f"{n}.dcm", image, "application/dicom")) for n, image in enumerate(images)],
    )
    assert response.status_code == 201, response.text
    written = export.deidentified_chunks

    def failing_on_the_second(source: Path, *args: object) -> Iterator[bytes]:
        chunks = written(source, *args)  # type: ignore[arg-type]
        yield next(chunks)
        if failing_on_the_second.calls:  # type: ignore[attr-defined]
            raise OSError("the stored file could not be read")
        failing_on_the_second.calls += 1  # type: ignore[attr-defined]
        yield from chunks

    failing_on_the_second.calls = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(export, "deidentified_chunks", failing_on_the_second)

    failed = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert failed.status_code == 500 and failed.headers["content-type"] != "application/zip"
    detail = failed.json()["detail"]
    assert re.match(r"released image [12] of 2 could not be read or de-identified \(OSError\)", detail), (
        detail
    )
    assert "nothing was exported" in detail
    assert list(ObjectStore.for_settings(settings).tmp_dir.glob("export-*")) == []


def test_head_of_the_export_answers_as_the_get_would_without_writing_the_zip(
    client: tuple[TestClient, Engine], settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD answers what the GET would (200 and a ZIP attachment, or 404 with nothing to export) without
    de-identifying every image into a ZIP only to drop it."""
    http, engine = client
    empty = records_requested(engine, settings)
    assert http.head(f"/v1/records/{empty}/export/deidentified").status_code == 404  # as its GET
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    image = make_us_instance(None, study_uid=study, series_uid=study + ".1", frames=2)
    uploaded = http.post(
        f"/v1/records/{case_id}/files", files=[("files", ("a.dcm", image, "application/dicom"))]
    )
    assert uploaded.status_code == 201, uploaded.text
    written: list[Path] = []
    write_zip = export._write_zip

    def counting(path: Path, *args: object) -> object:
        written.append(path)
        return write_zip(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(export, "_write_zip", counting)

    head = http.head(f"/v1/records/{case_id}/export/deidentified")
    assert (head.status_code, head.content, head.headers["content-type"]) == (200, b"", "application/zip")
    assert written == []
    got = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert got.headers["content-disposition"] == head.headers["content-disposition"]
    assert zipfile.ZipFile(io.BytesIO(got.content)).testzip() is None and len(written) == 1
    assert list(ObjectStore.for_settings(settings).tmp_dir.glob("export-*")) == []


def colour_clip_with_text_above_its_region(study: str, frames: int = 3) -> bytes:
    """An RGB clip (a Doppler cart's): a smooth colour image in the region, white text burned in above it."""
    data, clip = clip_with_text_above_its_region(study, frames)
    grey = np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(frames, 64, 64)
    rgb = np.zeros((frames, 64, 64, 3), dtype=np.uint8)
    rgb[..., 0] = 200  # red flow
    rgb[..., 1] = (np.arange(frames) * 20 + 40)[:, None, None]
    rgb[..., 2] = (np.arange(64) * 3)[None, None, :]
    rgb[grey == 255] = 255  # the text, white
    clip.SamplesPerPixel, clip.PhotometricInterpretation, clip.PlanarConfiguration = 3, "RGB", 0
    clip.PixelData = rgb.tobytes()
    buffer = io.BytesIO()
    clip.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def compressed_with_dcmtk(native: bytes, tool: str, option: str | None, folder: Path) -> Path:
    """`native` compressed as a cart or PACS sends it, by dcmtk (dcmcjpeg, dcmcjpls, dcmcrle), or as JPEG 2000
    by Pillow (`tool` "j2k", `option` "+irreversible" or None), which dcmtk does not write."""
    source, target = folder / "native.dcm", folder / f"{tool}{option or ''}.dcm"
    source.write_bytes(native)
    if tool == "j2k":
        target.write_bytes(jpeg_2000(native, irreversible=option == "+irreversible"))
        return target
    subprocess.run([tool, *([option] if option else []), str(source), str(target)], check=True, timeout=30)
    return target


def twelve_bit_clip_with_text_above_its_region(study: str, frames: int = 3) -> bytes:
    """A 12-bit grey clip (Bits Allocated 16, Stored 12), the text at 4095 above the region."""
    _, clip = clip_with_text_above_its_region(study, frames)
    grey = np.frombuffer(clip.PixelData, dtype=np.uint8).reshape(frames, 64, 64).astype("<u2")
    clip.BitsAllocated, clip.BitsStored, clip.HighBit = 16, 12, 11
    clip.PixelData = np.where(grey == 255, 4095, grey * 16).astype("<u2").tobytes()
    buffer = io.BytesIO()
    clip.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def jpeg_2000(native: bytes, *, irreversible: bool) -> bytes:
    """Each frame a JPEG 2000 codestream (Pillow, OpenJPEG), colour through its component transform (RCT
    lossless, ICT lossy), as a PACS archiving JPEG 2000 writes it; no Lossy Image Compression attributes."""
    ds = pydicom.dcmread(io.BytesIO(native))
    frames = []
    for frame in ds.pixel_array:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG2000", no_jp2=True, irreversible=irreversible, mct=1)
        frames.append(buffer.getvalue())
    ds.PixelData = pydicom.encaps.encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEG2000 if irreversible else pydicom.uid.JPEG2000Lossless
    if ds.SamplesPerPixel == 3:
        ds.PhotometricInterpretation = "YBR_ICT" if irreversible else "YBR_RCT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


COMPRESSIONS = {
    # what: tool, option, the clip (grey, colour or 12-bit grey), the lossy method (None: lossless)
    "jpeg-baseline-ybr": ("dcmcjpeg", "+eb", "colour", "ISO_10918_1"),
    "jpeg-baseline-grey": ("dcmcjpeg", "+eb", "grey", "ISO_10918_1"),
    "jpeg-lossless-grey": ("dcmcjpeg", "+e1", "grey", None),
    "jpeg-lossless-12-bit": ("dcmcjpeg", "+e1", "grey12", None),
    "jpeg-ls-grey": ("dcmcjpls", None, "grey", None),
    "jpeg-ls-near-lossless": ("dcmcjpls", "+en", "grey", "ISO_14495_1"),
    "jpeg-ls-12-bit": ("dcmcjpls", None, "grey12", None),
    "rle-rgb": ("dcmcrle", None, "colour", None),
    "jpeg-2000-rct": ("j2k", None, "colour", None),
    "jpeg-2000-ict": ("j2k", "+irreversible", "colour", "ISO_15444_1"),
}


@pytest.mark.parametrize("what", list(COMPRESSIONS))
def test_compressed_frames_are_decoded_cleaned_and_exported_native(
    client: tuple[TestClient, Engine], settings: Settings, tmp_path: Path, what: str
) -> None:
    """What carts and PACS send (JPEG Baseline and Lossless, JPEG-LS, JPEG 2000, RLE) is decoded frame by frame, its
    text blanked outside the regions, and written as Explicit VR Little Endian, flagged lossy when it was."""
    tool, option, kind, lossy = COMPRESSIONS[what]
    colour = kind == "colour"
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    native = {
        "grey": lambda: clip_with_text_above_its_region(study)[0],
        "colour": lambda: colour_clip_with_text_above_its_region(study),
        "grey12": lambda: twelve_bit_clip_with_text_above_its_region(study),
    }[kind]()
    compressed = compressed_with_dcmtk(native, tool, option, tmp_path)
    source = pydicom.dcmread(compressed)
    assert source.file_meta.TransferSyntaxUID.is_compressed
    decoded = source.pixel_array  # what any viewer shows of the original
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[("files", ("clip.dcm", compressed.read_bytes(), "application/dicom"))],
    )
    assert response.status_code == 201, response.text

    exported = http.get(f"/v1/records/{case_id}/export/deidentified")
    assert exported.status_code == 200, exported.text
    with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
        manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
        [name] = [n for n in archive.namelist() if n not in ("DICOMDIR", "DEIDENTIFICATION.json")]
        data = archive.read(name)
        dicomdir = pydicom.dcmread(io.BytesIO(archive.read("DICOMDIR")))
    assert (manifest["exported"], manifest["pixels_cleaned"], manifest["withheld"]) == (1, 1, 0)
    assert phi_found(data) == []
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    [image] = [r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE"]
    assert image.ReferencedTransferSyntaxUIDInFile == pydicom.uid.ExplicitVRLittleEndian
    assert ds.BurnedInAnnotation == "NO"
    assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113101"]
    bits = (16, 12, 11) if kind == "grey12" else (8, 8, 7)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.NumberOfFrames) == (*bits, 3)
    if colour:
        assert (ds.PhotometricInterpretation, ds.SamplesPerPixel, ds.PlanarConfiguration) == ("RGB", 3, 0)
    else:
        assert ds.PhotometricInterpretation == "MONOCHROME2" and "PlanarConfiguration" not in ds
    if lossy:  # PS3.3 C.7.6.1.1.5: once lossy, always flagged, with the method and ratio dcmtk recorded
        assert ds.LossyImageCompression == "01"
        assert ds.LossyImageCompressionMethod == lossy  # named from the syntax where the source said none
        assert ds.LossyImageCompressionRatio == source.get(
            "LossyImageCompressionRatio", ds.LossyImageCompressionRatio
        )
        assert float(ds.LossyImageCompressionRatio) > 0
    else:
        assert ds.get("LossyImageCompression") != "01"
    after = ds.pixel_array
    assert after.shape == decoded.shape
    inside = (slice(None), slice(16, 64), slice(8, 56))
    assert (after[inside] == decoded[inside]).all()  # the image itself as decoded, in every frame
    outside = np.ones((64, 64), dtype=bool)
    outside[16:64, 8:56] = False
    text = 4000 if kind == "grey12" else 200
    assert (after[:, outside] == 0).all() and (decoded[:, outside] > text).any()  # the text gone
    if colour:  # RGB, not YBR taken for RGB: the red flow is red
        red, green = after[inside][..., 0].astype(int), after[inside][..., 1].astype(int)
        assert abs(red.mean() - 200) < 8 and abs(green[0].mean() - 40) < 8
    path = tmp_path / "exported.dcm"
    path.write_bytes(data)
    errors = dciodvfy_errors(path)
    if kind == "grey12":  # the US Image module allows 8 bits only: the input has these errors already
        errors = [error for error in errors if error not in dciodvfy_errors(tmp_path / "native.dcm")]
    assert errors == [], errors


def dciodvfy_errors(path: Path) -> list[str]:
    run = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, errors="replace", timeout=30
    )
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_video_undecodable_and_oversized_instances_stay_withheld_saying_why(
    client: tuple[TestClient, Engine], settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    http, engine = client
    case_id = records_requested(engine, settings)
    study = f"1.2.826.0.1.3680043.10.{uuid.uuid4().int % 10**12}"
    native, _ = clip_with_text_above_its_region(study)
    jpeg = compressed_with_dcmtk(native, "dcmcjpeg", "+eb", tmp_path).read_bytes()
    # 12-bit JPEG Extended: neither Pillow nor GDCM decodes it (pylibjpeg-libjpeg would; not installed).
    twelve_bit = twelve_bit_clip_with_text_above_its_region(study)
    extended = compressed_with_dcmtk(twelve_bit, "dcmcjpeg", "+ee", tmp_path).read_bytes()
    files = {"jpeg.dcm": jpeg, "extended.dcm": extended}
    for name, syntax in (("video.dcm", pydicom.uid.MPEG4HP41), ("broken.dcm", pydicom.uid.JPEGBaseline8Bit)):
        clip = pydicom.dcmread(io.BytesIO(make_us_instance(None, study_uid=study, series_uid=study + ".2")))
        clip.BurnedInAnnotation = "YES"
        clip.file_meta.TransferSyntaxUID = syntax
        clip.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xdbframe\xff\xd9"])
        clip["PixelData"].VR = "OB"
        buffer = io.BytesIO()
        clip.save_as(buffer, enforce_file_format=True)
        files[name] = buffer.getvalue()
    response = http.post(
        f"/v1/records/{case_id}/files",
        files=[("files", (name, data, "application/dicom")) for name, data in files.items()],
    )
    assert response.status_code == 201, response.text

    def reasons() -> dict[str, tuple[int, str]]:
        exported = http.get(f"/v1/records/{case_id}/export/deidentified")
        assert exported.status_code == 200, exported.text
        with zipfile.ZipFile(io.BytesIO(exported.content)) as archive:
            manifest = json.loads(archive.read("DEIDENTIFICATION.json"))
        return {r["code"]: (r["count"], r["reason"]) for r in manifest["withheld_reasons"]}

    found = reasons()
    assert {code: count for code, (count, _) in found.items()} == {"video": 1, "pixel_data_not_decoded": 2}
    assert "video clip" in found["video"][1] and "12-bit JPEG Extended" in found["pixel_data_not_decoded"][1]
    # 3 frames of 64 x 64 decode to 12288 bytes: over a limit of 10000, the JPEG clip is withheld too.
    monkeypatch.setenv("RECORDS_DEIDENTIFY_MAX_DECODED_BYTES", "10000")
    deidentify.get_deidentify_limits.cache_clear()
    try:
        found = reasons()
    finally:
        monkeypatch.delenv("RECORDS_DEIDENTIFY_MAX_DECODED_BYTES")
        deidentify.get_deidentify_limits.cache_clear()
    # Both clips are over it (checked before decoding); the 1-frame broken one is not, and still undecoded.
    assert {code: count for code, (count, _) in found.items()} == {
        "video": 1,
        "pixel_data_not_decoded": 1,
        "decoded_too_large": 2,
    }
    assert "RECORDS_DEIDENTIFY_MAX_DECODED_BYTES" in found["decoded_too_large"][1]
