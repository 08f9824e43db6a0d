"""Records under concurrent requests on the real PostgreSQL: one side is paused at the point that matters, so
each race is run the same way every time."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from contracts.commands import ReconcileIdentity
from services.common.config import Settings
from services.records import api, uploads
from services.records.store import ObjectStore
from tests.integration.test_records_imports import (  # noqa: F401 (fixtures)
    client,
    engine,
    open_case,
    rows,
    send,
    study_uid,
    upload,
    us,
)


@pytest.fixture
def paused_upload(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[threading.Event, threading.Event]]:
    """(kept, go): an upload sets `kept` once its files are in the store and waits for `go` to commit."""
    kept, go = threading.Event(), threading.Event()
    assemble = uploads.assemble_if_complete

    def paused(*args: Any, **kwargs: Any) -> bool:
        kept.set()
        assert go.wait(10)
        return assemble(*args, **kwargs)

    monkeypatch.setattr(uploads, "assemble_if_complete", paused)
    yield kept, go
    go.set()


def test_a_rejected_import_leaves_the_object_an_upload_of_the_same_content_is_keeping(
    client: TestClient,  # noqa: F811
    engine: Engine,  # noqa: F811
    settings: Settings,
    paused_upload: tuple[threading.Event, threading.Event],
) -> None:
    """Content is stored once for every case that has it: a rejection removing its last committed reference
    must not remove the object another case's upload has just kept and is about to commit."""
    kept, go = paused_upload
    image = ("a.dcm", us(study_uid(), birth_date="19800110"), "application/dicom")
    first, second = open_case(engine, settings), open_case(engine, settings)
    go.set()
    held = upload(client, first, image).json()
    kept.clear()
    go.clear()
    answers: list[Any] = []
    uploading = threading.Thread(target=lambda: answers.append(upload(client, second, image)))
    uploading.start()
    assert kept.wait(10)
    decision = ReconcileIdentity(
        case_id=first, import_id=held["import_id"], decision="reject", decided_by="ops-1", reason="wrong CD"
    )
    rejecting = threading.Thread(target=send, args=(engine, settings, decision, first))
    rejecting.start()
    rejecting.join(0.5)  # the rejection's removal runs now, while the upload holds its kept object
    go.set()
    uploading.join(10)
    rejecting.join(10)
    assert answers[0].status_code == 201, answers[0].text
    [row] = rows(engine, second)
    assert ObjectStore.for_settings(settings).path(row.storage_path).exists()
    assert client.get(f"/v1/records/{second}").json()["imports"][0]["status"] == "identity_mismatch"


def test_a_partners_source_put_twice_at_once_is_one_row_holding_one_body(
    client: TestClient,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Both PUTs find no source yet: one creates it, the other then replaces it (never a 500), and the row
    holds one of the two bodies whole."""
    partner = f"clinic-{uuid.uuid4().hex[:8]}"
    both_looked = threading.Barrier(2, timeout=10)
    looks = iter(range(2))
    utcnow = api.utcnow

    def after_both_looked() -> datetime:
        if next(looks, None) is not None:
            both_looked.wait()  # each PUT has looked for the partner's source before either stores it
        return utcnow()

    monkeypatch.setattr(api, "utcnow", after_both_looked)
    bodies = [
        {"ae_title": "PACS_A", "host": "pacs-a.example", "port": 104, "return_reports": True},
        {"dicomweb_url": "https://pacs-b.example/dicom-web", "return_reports": False},
    ]
    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = list(pool.map(lambda body: client.put(f"/v1/records/sources/{partner}", json=body), bodies))

    assert [a.status_code for a in answers] == [200, 200], [a.text for a in answers]
    stored = client.get(f"/v1/records/sources/{partner}").json()
    assert any(all(stored[k] == v for k, v in body.items()) for body in bodies), stored
