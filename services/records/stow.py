"""STOW-RS (PS3.18 10.5): each instance of a request is stored or refused on its own, and the Store Instances
Response Module (PS3.18 Annex I) says which, in application/dicom+json.

    200  every instance stored, none with a warning
    202  some stored, and others failed or were stored with a warning (identifiers coerced on the way out,
         or held for an identity decision)
    409  none stored: Failed SOP Sequence gives each instance's Failure Reason (PS3.18 Table I.2-2)

An instance larger than one may be (MAX_UPLOAD_BYTES) is one of the refused: Out of Resources, named by the
File Meta Information at its start when that can be read. Whatever is wrong with the request as a whole
(multipart syntax 400, media type 415, too many parts 413) is answered before this module sees a part.
Failure items and the `Warning` header fields name a part by its position and the problem, never a patient
attribute.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

from services.common.errors import human_size
from services.records.archive import Entry
from services.records.classify import (
    DICOMDIR_SOP_CLASS,
    ClassifiedFile,
    FileRefused,
    HeaderReader,
    Unusability,
    classify,
    meta_uids,
)
from services.records.limits import ImportLimits
from services.records.models import FileKind, ImportStatus
from services.records.multipart_related import OversizedPart
from services.records.reconcile import OUR_ISSUER
from services.records.uploads import UploadOutcome


class FailureReason(IntEnum):
    """PS3.18 Table I.2-2, and one A9xx code of our own for an instance of another study than the URL's."""

    OUT_OF_RESOURCES = 0xA700
    DOES_NOT_MATCH_SOP_CLASS = 0xA900
    OTHER_STUDY = 0xA901
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122


COERCED = 0xB000  # Warning Reason: Coercion of Data Elements (PS3.18 Table I.2-1)
BY_KIND = {
    Unusability.UNREADABLE: FailureReason.CANNOT_UNDERSTAND,
    Unusability.INCOMPLETE: FailureReason.DOES_NOT_MATCH_SOP_CLASS,
    Unusability.TOO_LARGE: FailureReason.OUT_OF_RESOURCES,
}
MAX_WARNING_FIELDS = 20  # Warning header fields at most; the body lists every failure


@dataclass(frozen=True)
class Refusal:
    """One instance not stored, and why (`problem` follows "part 3 of the request")."""

    label: str
    sop_class_uid: str
    sop_instance_uid: str
    reason: FailureReason
    problem: str

    @property
    def message(self) -> str:
        return f"{self.label} {self.problem}; it was not stored"


def sort_parts(
    parts: Sequence[Entry | OversizedPart],
    limits: ImportLimits,
    read_header: HeaderReader | None,
    study: str | None,
) -> tuple[list[ClassifiedFile], list[Refusal]]:
    """Each part as a usable instance or as a refusal; every part is one or the other."""
    usable: list[ClassifiedFile] = []
    refused: list[Refusal] = []
    for entry in parts:
        if isinstance(entry, OversizedPart):
            refused.append(_too_large(entry))
            continue
        try:
            item = classify(
                entry.received,
                total=len(parts),
                declared_type=entry.declared_type,
                max_pixel_bytes=limits.max_pixel_bytes,
                max_header_bytes=limits.max_header_bytes,
                label=entry.label,
                read_header=read_header,
            )
        except FileRefused as exc:
            sop_class, sop = meta_uids(entry.received.path)
            refused.append(Refusal(entry.label, sop_class, sop, BY_KIND[exc.kind], exc.problem))
            continue
        header = item.dicom
        if item.kind == FileKind.DICOMDIR or header is None:
            sop_class, sop = meta_uids(entry.received.path)
            refused.append(
                Refusal(
                    entry.label,
                    sop_class or DICOMDIR_SOP_CLASS,
                    sop,
                    FailureReason.SOP_CLASS_NOT_SUPPORTED,
                    "is a DICOMDIR (a media index), not an instance; send the instances it lists",
                )
            )
        elif study is not None and header.study_instance_uid != study:
            refused.append(
                Refusal(
                    entry.label,
                    header.sop_class_uid,
                    header.sop_instance_uid,
                    FailureReason.OTHER_STUDY,
                    "belongs to another study than the one this URL names; store it at /studies instead",
                )
            )
        else:
            usable.append(item)
    return usable, refused


def _too_large(part: OversizedPart) -> Refusal:
    sop_class, sop = meta_uids(part.head)
    return Refusal(
        part.label,
        sop_class,
        sop,
        FailureReason.OUT_OF_RESOURCES,
        f"is {human_size(part.size_bytes)}, more than the {human_size(part.limit)} one instance may be; "
        "ask the facility for a compressed export or one with fewer frames",
    )


def refuse_all(usable: Iterable[ClassifiedFile], reason: FailureReason, problem: str) -> list[Refusal]:
    """Usable instances that could still not be stored (the case is closed): one refusal each."""
    return [
        Refusal(
            f"part {item.received.position} of the request",
            item.dicom.sop_class_uid if item.dicom else "",
            item.dicom.sop_instance_uid if item.dicom else "",
            reason,
            problem,
        )
        for item in usable
    ]


def response_module(
    base: str,
    usable: list[ClassifiedFile],
    refused: list[Refusal],
    outcome: UploadOutcome | None,
    identifiers: dict[str, str],
) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module for what was stored and what was not."""
    held = (
        outcome is not None
        and outcome.record_import is not None
        and outcome.record_import.status != ImportStatus.RELEASED
    )
    stored = {f.sha256: f for f in (outcome.files if outcome else []) if f.sop_instance_uid}
    referenced, warned = [], False
    for item in usable:
        row = stored.get(item.received.sha256)
        if row is None or item.dicom is None:
            continue
        item_body = {
            "00081150": _attr("UI", *([row.sop_class_uid] if row.sop_class_uid else [])),
            "00081155": _attr("UI", row.sop_instance_uid),
            "00081190": _attr(
                "UR",
                f"{base}/studies/{row.study_instance_uid}/series/{row.series_instance_uid}"
                f"/instances/{row.sop_instance_uid}",
            ),
        }
        # Held for an identity decision (nothing is retrievable until a human accepts it), or handed out
        # with our Patient ID, Issuer and Accession Number (IHE IRWF): either way a coercion warning.
        if held or _coerced(item, identifiers):
            item_body["00081196"] = _attr("US", COERCED)  # per item (PS3.18 Table I.1-1)
            warned = True
        referenced.append(item_body)
    studies = {row.study_instance_uid for row in stored.values()}
    body: dict[str, Any] = {
        "00081190": _attr("UR", *([f"{base}/studies/{studies.pop()}"] if len(studies) == 1 else [])),
    }
    if referenced:
        body["00081199"] = _attr("SQ", *referenced)
    if refused:
        body["00081198"] = _attr("SQ", *(_failed_item(r) for r in refused))
    if not referenced:
        return 409, body
    return (202 if refused or warned else 200), body


def warning_fields(refused: list[Refusal]) -> str:
    """The `Warning` header (RFC 7234 5.5, as PS3.18 8.5 uses it): what went wrong with each refusal."""
    fields = [f'299 - "{r.message.replace(chr(34), chr(39))}"' for r in refused[:MAX_WARNING_FIELDS]]
    if len(refused) > MAX_WARNING_FIELDS:
        fields.append(f'299 - "{len(refused) - MAX_WARNING_FIELDS} more instances were not stored"')
    return ", ".join(fields)


def _coerced(item: ClassifiedFile, identifiers: dict[str, str]) -> bool:
    header = item.dicom
    assert header is not None
    return (header.identity.patient_id, header.issuer_of_patient_id, header.accession_number) != (
        identifiers["PatientID"],
        OUR_ISSUER,
        identifiers["AccessionNumber"],
    )


def _failed_item(refusal: Refusal) -> dict[str, Any]:
    return {
        "00081150": _attr("UI", *([refusal.sop_class_uid] if refusal.sop_class_uid else [])),
        "00081155": _attr("UI", *([refusal.sop_instance_uid] if refusal.sop_instance_uid else [])),
        "00081197": _attr("US", int(refusal.reason)),
    }


def _attr(vr: str, *values: Any) -> dict[str, Any]:
    return {"vr": vr, "Value": list(values)} if values else {"vr": vr}
