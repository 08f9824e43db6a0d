"""STOW-RS: each part of a request sorted into a usable instance or a refusal with its PS3.18 Failure Reason."""

import io
from collections.abc import AsyncIterator
from pathlib import Path

import pydicom
import pytest

from services.common.errors import human_size
from services.records.archive import Entry
from services.records.header_probe import isolated_reader
from services.records.limits import ImportLimits
from services.records.multipart_related import BodyTooLarge, RelatedPartsReader, receive_parts
from services.records.store import FileTooLarge, ObjectStore
from services.records.stow import FailureReason, sort_parts
from tests.dicom_factory import make_us_instance
from tests.hostile_corpus import dicomdir_pointing_to

STUDY = "1.2.826.0.1.3680043.10.7"


def parts(tmp_path: Path, *bodies: bytes) -> list[Entry]:
    store = ObjectStore(tmp_path)
    return [
        Entry(
            store.receive(io.BytesIO(body), position=n, total=n, limit=10_000_000),
            None,
            f"part {n} of the request",
            declared_type="application/dicom",
        )
        for n, body in enumerate(bodies, start=1)
    ]


def without(data: bytes, keyword: str) -> bytes:
    dataset = pydicom.dcmread(io.BytesIO(data))
    delattr(dataset, keyword)
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_each_part_is_stored_or_refused_with_the_reason_ps3_18_lists(tmp_path: Path) -> None:
    image = make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.1")
    clip = make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.2", frames=8)
    no_sop = without(
        make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.3"), "SOPInstanceUID"
    )
    entries = parts(
        tmp_path, image, clip, no_sop, dicomdir_pointing_to("IM1"), b"\0" * 128 + b"DICM" + b"\xff" * 64
    )
    limits = ImportLimits(max_pixel_bytes=64 * 64 * 4, parse_in_subprocess=False)

    usable, refused = sort_parts(entries, limits, None, None)

    assert [u.dicom.sop_instance_uid for u in usable if u.dicom] == ["1.2.3.1"]
    assert [(r.label, r.reason) for r in refused] == [
        ("part 2 of the request", FailureReason.OUT_OF_RESOURCES),  # over the pixel budget
        ("part 3 of the request", FailureReason.DOES_NOT_MATCH_SOP_CLASS),
        ("part 4 of the request", FailureReason.SOP_CLASS_NOT_SUPPORTED),  # a DICOMDIR is no instance
        ("part 5 of the request", FailureReason.CANNOT_UNDERSTAND),
    ]
    assert [r.sop_instance_uid for r in refused[:2]] == ["1.2.3.2", "1.2.3.3"]  # the second from its meta
    assert (refused[2].sop_class_uid, refused[3].sop_instance_uid) == ("1.2.840.10008.1.3.10", "")
    assert refused[0].message.endswith(
        "of one instance; ask the facility for an export with fewer frames; it was not stored"
    )


def test_the_reason_survives_a_header_parsed_in_a_worker_process(tmp_path: Path) -> None:
    no_modality = without(make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1"), "Modality")
    read = isolated_reader(memory_bytes=1024**3, timeout=20)
    _, [refused] = sort_parts(parts(tmp_path, no_modality), ImportLimits(), read, None)
    assert refused.reason == FailureReason.DOES_NOT_MATCH_SOP_CLASS


async def chunks_of(body: bytes, size: int) -> AsyncIterator[bytes]:
    for offset in range(0, len(body), size):
        yield body[offset : offset + size]


async def test_an_instance_over_the_size_limit_is_read_past_and_refused_on_its_own(tmp_path: Path) -> None:
    """A part larger than one instance may be is dropped as it streams (nothing of it stays on disk), the parts
    after it are received, and its refusal names it by its File Meta Information where that can be read."""
    first = make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.1")
    clip = make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.2", frames=16)
    last = make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.3")
    body = b"".join(
        b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + data + b"\r\n"
        for data in (first, clip, last, b"\xff" * 40_000)
    )
    store = ObjectStore(tmp_path)
    limit = 16 * 1024

    parts = await receive_parts(
        'multipart/related; type="application/dicom"; boundary=b0undary',
        chunks_of(body + b"--b0undary--\r\n", 4096),
        store,
        max_parts=10,
        limit=limit,
        max_total=len(body) * 2,
    )
    usable, refused = sort_parts(parts, ImportLimits(parse_in_subprocess=False), None, None)

    assert [u.dicom.sop_instance_uid for u in usable if u.dicom] == ["1.2.3.1", "1.2.3.3"]
    clip_class = pydicom.dcmread(io.BytesIO(clip)).SOPClassUID
    assert [(r.label, r.sop_class_uid, r.sop_instance_uid, r.reason) for r in refused] == [
        ("part 2 of the request", clip_class, "1.2.3.2", FailureReason.OUT_OF_RESOURCES),
        ("part 4 of the request", "", "", FailureReason.OUT_OF_RESOURCES),  # nothing in it names it
    ]
    assert refused[0].message == (
        f"part 2 of the request is {human_size(len(clip))}, more than the 16 KiB one instance may be; ask "
        "the facility for a compressed export or one with fewer frames; it was not stored"
    )
    # Only the two instances received are in the temp area, whole.
    assert sorted(p.stat().st_size for p in store.tmp_dir.iterdir()) == sorted([len(first), len(last)])


def test_a_retrieved_body_with_a_part_over_the_limit_is_refused_whole(tmp_path: Path) -> None:
    """A WADO-RS response (retrieval, archive reads) is no STOW-RS request: there the whole body is refused."""
    store = ObjectStore(tmp_path)
    reader = RelatedPartsReader(
        'multipart/related; type="application/dicom"; boundary=b0undary',
        store,
        max_parts=10,
        limit=1024,
        label="WADO-RS response",
    )
    reader.feed(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 100 + b"\r\n")
    with pytest.raises(FileTooLarge):
        reader.feed(b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + b"x" * 2000)
    assert list(store.tmp_dir.iterdir()) == []


async def test_a_request_over_the_total_bound_is_refused_whole(tmp_path: Path) -> None:
    """Parts read past are not stored but still arrive: without a bound on the body, one endless oversized
    part would hold the request open for good. Over the bound, the whole request is refused (413), and the
    instances received before it are gone from the temp area."""
    first = make_us_instance(None, study_uid=STUDY, series_uid=STUDY + ".1", sop_uid="1.2.3.1")
    body = b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + first + b"\r\n"
    body += (
        b"--b0undary\r\nContent-Type: application/dicom\r\n\r\n" + b"\0" * 200_000 + b"\r\n--b0undary--\r\n"
    )
    store = ObjectStore(tmp_path)
    with pytest.raises(
        BodyTooLarge, match=r"larger than the 64 KiB one request may hold; send fewer instances"
    ):
        await receive_parts(
            'multipart/related; type="application/dicom"; boundary=b0undary',
            chunks_of(body, 4096),
            store,
            max_parts=10,
            limit=16 * 1024,
            max_total=64 * 1024,
        )
    assert list(store.tmp_dir.iterdir()) == []
