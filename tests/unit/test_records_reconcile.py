import io
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from services.common.dicom_identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from services.records.classify import PatientIdentity
from services.records.reconcile import coerced_chunks, differences, our_identifiers
from tests.dicom_factory import make_us_instance

PATIENT = {
    "family_name": "Núñez",
    "given_name": "Ana María",
    "birth_date": "1980-01-01",
    "sex": "female",
    "mrn": "M7",
}


@pytest.mark.parametrize(
    ("identity", "expected"),
    [
        (PatientIdentity("NUNEZ^ANA^M", "M7", "19800101", "F"), []),
        (PatientIdentity("nunez^ana", "", "", ""), []),  # absent attributes are not evidence
        (PatientIdentity("NUNEZ", "M7", "19800101", "F"), []),
        (PatientIdentity("NUNEZ^ANA", "M7", "19800110", "F"), ["PatientBirthDate"]),
        (PatientIdentity("NUNEZ^ANA", "M7", "19800101", "M"), ["PatientSex"]),
        (PatientIdentity("SMITH^ANA", "OTHER", "19800101", "F"), ["PatientID", "PatientName"]),
    ],
)
def test_differences_name_attributes_only(identity: PatientIdentity, expected: list[str]) -> None:
    assert differences([identity], PATIENT) == expected


def test_two_patients_in_one_import_differ() -> None:
    ours = PatientIdentity("NUNEZ^ANA", "M7", "19800101", "F")
    theirs = PatientIdentity("ROE^RICHARD", "X1", "19700101", "M")
    assert differences([ours, theirs], PATIENT) == [
        "PatientBirthDate",
        "PatientID",
        "PatientName",
        "PatientSex",
    ]


def test_our_identifiers_use_the_requested_accession_when_named() -> None:
    case_id = "0f8e2a4c-1111-2222-3333-444455556666"
    assert our_identifiers(case_id, {}) == {
        "PatientID": f"SO-{case_id}",
        "IssuerOfPatientID": "SECONDOPINION",
        "AccessionNumber": "0F8E2A4C11112222",
    }
    assert our_identifiers(case_id, {"accession_number": "ACC9"})["AccessionNumber"] == "ACC9"


def test_an_accession_that_is_no_dicom_accession_number_is_not_written_into_one() -> None:
    """The case API takes 64 characters; Accession Number (SH) holds 16 and no backslash: a copy handed out
    with the requested value was invalid (dciodvfy: "Length invalid for this VR"), one a PACS may refuse."""
    case_id = "0f8e2a4c-1111-2222-3333-444455556666"
    for requested in ("BAYVIEW-RIS-2026-000042", "ACC\\9", "ACC\n9"):
        assert (
            our_identifiers(case_id, {"accession_number": requested})["AccessionNumber"] == "0F8E2A4C11112222"
        )
    assert our_identifiers(case_id, {"accession_number": "A" * 16})["AccessionNumber"] == "A" * 16


def test_coercion_keeps_originals_and_copies_pixels_untouched(tmp_path: Path) -> None:
    source = tmp_path / "a.dcm"
    make_us_instance(source, study_uid="1.2.3", series_uid="1.2.3.1", frames=5, accession_number="OLD1")
    at = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
    values = {"PatientID": "SO-x", "IssuerOfPatientID": "SECONDOPINION", "AccessionNumber": "NEW1"}
    coerced = pydicom.dcmread(io.BytesIO(b"".join(coerced_chunks(source, values, at))))
    original = pydicom.dcmread(source)
    assert (coerced.PatientID, coerced.AccessionNumber, coerced.NumberOfFrames) == ("SO-x", "NEW1", 5)
    assert coerced.PixelData == original.PixelData
    [item] = coerced.OriginalAttributesSequence
    assert (item.ModifyingSystem, item.AttributeModificationDateTime) == ("SECONDOPINION", "20261128040000")
    kept = item.ModifiedAttributesSequence[0]
    assert (kept.PatientID, kept.AccessionNumber, kept.IssuerOfPatientID) == ("MRN1", "OLD1", "")


def test_the_copy_handed_out_names_us_as_its_writer_in_its_file_meta(tmp_path: Path) -> None:
    # PS3.10 7.1: the Implementation Class UID and Source AE Title name who wrote the file's content; the copy we
    # hand out has our identifiers in it, so the modality's would name a writer that never wrote these bytes.
    source = tmp_path / "a.dcm"
    make_us_instance(source, study_uid="1.2.3", series_uid="1.2.3.1", frames=2)
    original = pydicom.dcmread(source)
    original.file_meta.ImplementationClassUID = pydicom.uid.UID("1.2.826.0.1.3680043.9.9999")
    original.file_meta.ImplementationVersionName = "MODALITY_7"
    original.file_meta.SourceApplicationEntityTitle = "US_ROOM_3"
    original.file_meta.SendingApplicationEntityTitle = "FACILITY_PACS"
    original.file_meta.ReceivingApplicationEntityTitle = "MEDIA_READER"
    original.file_meta.PrivateInformationCreatorUID = "1.2.826.0.1.3680043.9.9999.1"
    original.file_meta.PrivateInformation = b"vendor"
    original.save_as(source, enforce_file_format=True)
    at = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
    meta = pydicom.dcmread(io.BytesIO(b"".join(coerced_chunks(source, {"PatientID": "SO-x"}, at)))).file_meta
    assert (meta.ImplementationClassUID, meta.ImplementationVersionName) == (
        IMPLEMENTATION_CLASS_UID,
        IMPLEMENTATION_VERSION_NAME,
    )
    assert meta.SourceApplicationEntityTitle == "SECONDOPINION"
    assert "SendingApplicationEntityTitle" not in meta and "ReceivingApplicationEntityTitle" not in meta
    # What identifies the instance and its encoding, and the creator's private information, are kept.
    assert (meta.MediaStorageSOPInstanceUID, meta.TransferSyntaxUID) == (
        original.SOPInstanceUID,
        original.file_meta.TransferSyntaxUID,
    )
    assert (meta.PrivateInformationCreatorUID, meta.PrivateInformation) == (
        "1.2.826.0.1.3680043.9.9999.1",
        b"vendor",
    )


def test_an_implicit_vr_instance_is_handed_out_as_explicit_vr_little_endian(tmp_path: Path) -> None:
    # PS3.18 8.7.3: Implicit VR Little Endian is not used with web services; what the SCP received as
    # such (storescu -xi) is served as Explicit VR Little Endian, the pixels copied byte for byte.
    explicit = tmp_path / "explicit.dcm"
    make_us_instance(explicit, study_uid="1.2.3", series_uid="1.2.3.1", frames=3)
    dataset = pydicom.dcmread(explicit)
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    implicit = tmp_path / "implicit.dcm"
    dataset.save_as(implicit, enforce_file_format=True)
    assert pydicom.dcmread(implicit).file_meta.TransferSyntaxUID == pydicom.uid.ImplicitVRLittleEndian
    at = datetime(2026, 11, 28, 4, 0, tzinfo=UTC)
    served = b"".join(coerced_chunks(implicit, {"PatientID": "SO-x"}, at))
    coerced = pydicom.dcmread(io.BytesIO(served))
    assert coerced.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert coerced.PixelData == dataset.PixelData and coerced.PatientID == "SO-x"
    assert coerced.NumberOfFrames == 3
