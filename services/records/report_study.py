"""The second-opinion report placed into the study it reads, with that study's identity as its images carry it.

The review service writes the report instance from the case as intake took it (exam date, accession, the
patient as requested). A viewer groups a study by what its instances say, so a report that says otherwise
than the images lands beside the study, not in it. Records holds the images: before the report is imported,
its Patient and General Study attributes are replaced by the values of the study's released images (and,
when that is another study than the one the report named, it gets a Series and SOP Instance UID of its own
there: the same UID in two studies would break a PACS).
Released means their identity was reconciled (IHE IRWF: matched the case's patient, or a human accepted
the difference). So the stored report carries the facility's identifiers as its images do (Patient ID, Issuer
of Patient ID and its qualifiers, Accession Number and its issuer): the copy sent back to the facility's PACS
is this one (report_return.py). Handed out by records, Patient ID, Issuer and Accession Number are coerced to
ours for the report exactly as for the images (reconcile.py), the facility's kept as the originals, so in
each domain report and images agree.

A report is placed once, when it is stored (or, come while the case's images wait for an identity decision,
after that decision: second_opinion.py), and every copy records hands out or sends back is that stored one:
one SOP Instance UID, one patient and study; only the identifiers differ by domain, as IRWF coerces them.
`stored_report` finds it by the UID the review service issued it under.
"""

from __future__ import annotations

import copy
import io
from collections import Counter

import pydicom
from pydicom.charset import python_encoding
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlmodel import Session, col, select

from services.records.models import FileKind, ImportStatus, RecordFile, RecordImport
from services.records.store import ObjectStore

REPORT_SOURCE = "second-opinion"
# PS3.3 C.7.1.1 Patient and C.7.2.1 General Study: what a viewer groups and labels a study by; and of
# C.7.2.2 Patient Study what an ultrasound cart writes (the patient at the time of the study): one instance of
# the study without them is an inconsistent Study (dcentvfy), and a PACS shows the age of the instance it read.
IDENTITY = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
# Type 3: left out when the images have none. The issuers' details go with their identifiers: the copy sent
# back must say the facility's Patient ID and Accession Number are the facility's, as its images do.
OPTIONAL = {
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
}
SAMPLE = 8  # the study's first instances read for its identity (each value: the first one that has it)
# The VRs whose text Specific Character Set encodes (PS3.5 6.1.2.3).
TEXT_VRS = {"LO", "LT", "PN", "SH", "ST", "UC", "UT"}


def place_in_study(dicom: bytes, case_id: str, session: Session, store: ObjectStore) -> bytes | None:
    """The report with the identity of the study it reads as the case's released images have it; None when
    records holds no released image (then the report keeps what it says)."""
    report = pydicom.dcmread(io.BytesIO(dicom))
    named_study = str(report.get("StudyInstanceUID") or "")
    images = _study_images(session, case_id, named_study)
    if not images:
        return None
    identity = _identity(images, store)
    charset = _header(store, images[0]).get("SpecificCharacterSet")
    moved_to = str(identity.get("StudyInstanceUID") or named_study)
    if moved_to != named_study:
        # Into another study than the review named: a series and an instance belong to one study only, so
        # the copy placed there is a new instance in a new series (UIDs derived, the same on every redelivery).
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID"):
            setattr(report, keyword, moved_uid(str(report.get(keyword) or ""), moved_to))
        report.file_meta.MediaStorageSOPInstanceUID = report.SOPInstanceUID
    for keyword in IDENTITY:
        value = identity.get(keyword)
        if value not in (None, ""):
            setattr(report, keyword, copy.deepcopy(value))
        elif keyword in OPTIONAL:
            if keyword in report:
                delattr(report, keyword)
        else:
            setattr(report, keyword, "")  # Type 2: present and empty, as on the images
    _in_character_set(report, charset)
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def moved_uid(uid: str, study_uid: str) -> str:
    """The UID a series or instance the review named gets when placed into `study_uid` instead."""
    return str(generate_uid(entropy_srcs=[uid, study_uid]))


def stored_report(session: Session, case_id: str, issued_uid: str) -> tuple[RecordFile, RecordImport] | None:
    """The case's stored copy of the report instance the review service issued as `issued_uid` (released or
    not), with its import: under that UID, or under the UID it got when placed into another study. The
    last stored when there are several (a redelivery placed with other bytes), as WADO-RS serves it."""
    rows = session.exec(
        select(RecordFile, RecordImport)
        .join(RecordImport, col(RecordFile.import_id) == col(RecordImport.import_id))
        .where(
            RecordFile.case_id == case_id,
            RecordImport.source == REPORT_SOURCE,
            col(RecordFile.sop_instance_uid).is_not(None),
        )
        .order_by(col(RecordFile.id).desc())
    ).all()
    for row, record_import in rows:
        study = str(row.study_instance_uid or "")
        if row.sop_instance_uid in (issued_uid, moved_uid(issued_uid, study)):
            return row, record_import
    return None


def images_held(session: Session, case_id: str) -> bool:
    """Whether images of the case wait for a person's identity decision (its report may not be placed yet)."""
    return (
        session.exec(
            select(RecordImport.import_id).where(
                RecordImport.case_id == case_id,
                RecordImport.status == ImportStatus.IDENTITY_MISMATCH,
                RecordImport.source != REPORT_SOURCE,
            )
        ).first()
        is not None
    )


def stored_unplaced_while_held(session: Session, case_id: str, sha256: str) -> RecordImport | None:
    """The released import of the case's report with this content if it was stored while images of the case
    waited for an identity decision and none was released, so with nothing to place it: how the version before
    last stored such a report (it placed it at send time). This version keeps such a report aside until the
    decision (`AWAITING_PLACEMENT`) and sends it as stored, so one queued then would go back unplaced."""
    report = session.exec(
        select(RecordImport)
        .join(RecordFile, col(RecordFile.import_id) == col(RecordImport.import_id))
        .where(
            RecordFile.case_id == case_id,
            RecordFile.sha256 == sha256,
            RecordImport.source == REPORT_SOURCE,
            RecordImport.status == ImportStatus.RELEASED,
        )
    ).first()
    if report is None:
        return None
    stored_at = report.created_at
    before = session.exec(
        select(RecordImport).where(
            RecordImport.case_id == case_id,
            RecordImport.source != REPORT_SOURCE,
            col(RecordImport.created_at) <= stored_at,
        )
    ).all()
    # Held then: not decided yet, or decided after; released then: released at once, or decided before.
    held = any(
        i.status == ImportStatus.IDENTITY_MISMATCH or (i.decided_at is not None and i.decided_at > stored_at)
        for i in before
    )
    released = any(
        i.status == ImportStatus.RELEASED and (i.decided_at is None or i.decided_at <= stored_at)
        for i in before
    )
    return report if held and not released else None


def _study_images(session: Session, case_id: str, study_uid: str) -> list[RecordFile]:
    """The first released instances (not our own reports) of the report's study; of the study with most
    instances when the report names none that records holds (the study records summarised for review)."""
    rows = session.exec(
        select(RecordFile)
        .join(RecordImport, col(RecordFile.import_id) == col(RecordImport.import_id))
        .where(
            RecordFile.case_id == case_id,
            RecordFile.kind == FileKind.DICOM,
            col(RecordFile.released).is_(True),
            col(RecordFile.study_instance_uid).is_not(None),
            RecordImport.source != REPORT_SOURCE,
        )
        .order_by(col(RecordFile.id))
    ).all()
    by_study: dict[str, list[RecordFile]] = {}
    for row in rows:
        by_study.setdefault(str(row.study_instance_uid), []).append(row)
    if not by_study:
        return []
    if study_uid not in by_study:
        counts = Counter({uid: len(members) for uid, members in by_study.items()})
        study_uid = counts.most_common(1)[0][0]  # on a tie, the study stored first
    return by_study[study_uid][:SAMPLE]


def _identity(images: list[RecordFile], store: ObjectStore) -> dict[str, object]:
    found: dict[str, object] = {}
    for row in images:
        header = _header(store, row)
        for keyword in IDENTITY:
            if keyword in found or keyword not in header:
                continue
            value = header[keyword].value
            if value is not None and (len(value) > 0 if header[keyword].VR == "SQ" else value != ""):
                # Person names as text: the report is UTF-8 whatever character set the image used.
                found[keyword] = str(value) if header[keyword].VR == "PN" else value
    return found


def _in_character_set(report: Dataset, charset: object) -> None:
    """The report written in the images' character set where every text in it fits, so the patient's name is
    the images' byte for byte: a PACS that compares names as stored (dcentvfy does) would see another patient
    in a Latin-1 study whose report spells the name in UTF-8. Kept UTF-8 (as issued) otherwise, and where
    the images switch character sets within a value (code extensions, ISO 2022)."""
    if not isinstance(charset, str) or charset in ("", "ISO_IR 192") or charset.startswith("ISO 2022"):
        return
    codec = python_encoding.get(charset)
    if codec is None:
        return
    for element in report.iterall():
        if element.VR not in TEXT_VRS or element.value is None:
            continue
        for value in element.value if element.VM > 1 else [element.value]:
            try:
                str(value).encode(codec)
            except UnicodeEncodeError:
                return
    report.SpecificCharacterSet = charset


def _header(store: ObjectStore, row: RecordFile) -> Dataset:
    path = store.local_path(row.storage_path, row.sha256)
    return pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SpecificCharacterSet", *IDENTITY])
