"""DICOM Storage Commitment, Push Model (PS3.4 Annex J, SOP Class 1.2.840.10008.1.20.1): the datasets both
directions exchange. The requester sends an N-ACTION (Action Type 1) naming a Transaction UID and the instances
(Referenced SOP Sequence); the committer answers later with an N-EVENT-REPORT on the same association if it is
still open, or on one it opens to the requester (proposing the SCP role): Event Type 1 when every instance is
committed, 2 when some failed (Failed SOP Sequence, each with a Failure Reason).

We ask for it on each report returned to a facility's PACS (report_return.py) and answer it for what a
facility's PACS sent us (commitment_scp.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]

STORAGE_COMMITMENT = StorageCommitmentPushModel
# The well-known SOP Instance of the Push Model: every N-ACTION and N-EVENT-REPORT names it.
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # the Action Type ID of "Request Storage Commitment"
ALL_COMMITTED, FAILURES_EXIST = 1, 2  # Event Type IDs of the result
# Failure Reason (0008,1197) values for the Failed SOP Sequence (PS3.3 C.14.1.1).
PROCESSING_FAILURE = 0x0110
NO_SUCH_OBJECT_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119
FAILURE_REASONS = {
    PROCESSING_FAILURE: "processing failure",
    NO_SUCH_OBJECT_INSTANCE: "no such object instance",
    0x0213: "resource limitation",
    0x0122: "referenced SOP Class not supported",
    CLASS_INSTANCE_CONFLICT: "class/instance conflict",
    0x0131: "duplicate transaction UID",
}
# DIMSE statuses of our answers to an N-ACTION or N-EVENT-REPORT (PS3.7 Annex C).
SUCCESS, NO_SUCH_ARGUMENT, INVALID_ARGUMENT_VALUE = 0x0000, 0x0114, 0x0115
NO_SUCH_EVENT_TYPE, NO_SUCH_ACTION, NOT_AUTHORIZED = 0x0113, 0x0123, 0x0124


@dataclass(frozen=True)
class Reference:
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class Failure:
    reference: Reference
    reason: int

    def describe(self) -> str:
        meaning = FAILURE_REASONS.get(self.reason, "a reason the standard does not name")
        return f"Failure Reason 0x{self.reason:04X}, {meaning}"


@dataclass(frozen=True)
class Result:
    """An N-EVENT-REPORT's content: the transaction, what was committed and what was not, and why."""

    transaction_uid: str
    committed: list[Reference]
    failed: list[Failure]


class Malformed(ValueError):
    """An N-ACTION or N-EVENT-REPORT that does not carry what Annex J requires."""


def request_dataset(transaction_uid: str, references: Iterable[Reference]) -> Dataset:
    """The Action Information of an N-ACTION asking for `references` to be committed."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = Sequence([_item(r) for r in references])
    return ds


def result_dataset(result: Result) -> tuple[int, Dataset]:
    """The Event Type ID and Event Information of the N-EVENT-REPORT answering a transaction."""
    ds = Dataset()
    ds.TransactionUID = result.transaction_uid
    if result.committed:
        ds.ReferencedSOPSequence = Sequence([_item(r) for r in result.committed])
    if not result.failed:
        return ALL_COMMITTED, ds
    failed = []
    for failure in result.failed:
        item = _item(failure.reference)
        item.FailureReason = failure.reason
        failed.append(item)
    ds.FailedSOPSequence = Sequence(failed)
    return FAILURES_EXIST, ds


def read_request(info: Dataset | None) -> tuple[str, list[Reference]]:
    """The Transaction UID and the instances of an N-ACTION's Action Information (raises Malformed)."""
    if info is None or not info.get("TransactionUID"):
        raise Malformed("the request has no Transaction UID")
    references = _references(info.get("ReferencedSOPSequence"))
    if not references:
        raise Malformed("the request names no instance (Referenced SOP Sequence)")
    return str(info.TransactionUID), references


def read_result(event_type: int | None, info: Dataset | None) -> Result:
    """What an N-EVENT-REPORT says (raises Malformed)."""
    if event_type not in (ALL_COMMITTED, FAILURES_EXIST):
        raise Malformed(f"event type {event_type} is not a storage commitment result")
    if info is None or not info.get("TransactionUID"):
        raise Malformed("the result has no Transaction UID")
    failed = []
    for item in info.get("FailedSOPSequence") or []:
        [reference] = _references([item]) or [Reference("", "")]
        failed.append(Failure(reference, int(item.get("FailureReason", PROCESSING_FAILURE))))
    committed = _references(info.get("ReferencedSOPSequence"))
    if event_type == FAILURES_EXIST and not failed:
        raise Malformed("a result saying failures exist lists none (Failed SOP Sequence)")
    return Result(str(info.TransactionUID), committed, failed)


def _item(reference: Reference) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = reference.sop_class_uid
    item.ReferencedSOPInstanceUID = reference.sop_instance_uid
    return item


def _references(items: Iterable[Dataset] | None) -> list[Reference]:
    found = []
    for item in items or []:
        instance = str(item.get("ReferencedSOPInstanceUID") or "")
        if not instance:
            raise Malformed("an item names no Referenced SOP Instance UID")
        found.append(Reference(str(item.get("ReferencedSOPClassUID") or ""), instance))
    return found
