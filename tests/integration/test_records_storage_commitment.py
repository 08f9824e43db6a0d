"""DICOM Storage Commitment (Push Model) with a real Orthanc, both ways. As the facility's PACS, Orthanc is asked
to commit each report we send back, and answers on an association it opens to our SCP: the return is done
only then; a PACS that lost the instance, or never answers, gets it again and then the return fails saying
why. As the one who sent us a study, Orthanc asks us (its REST API, `POST /modalities/{id}/storage-commitment`)
to commit instances: its report shows those we hold committed and one we do not hold failed (0x0112). A PACS
that answers on the requester's own association (no PACS here does: pynetdicom plays one) is heard there.

No loop runs in the background here: each test runs the passes itself, and leaves no return or answer due.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import EncapsulatedPDFStorage  # type: ignore[attr-defined]
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from services.common.config import Settings
from services.records import commitment_scp, report_return
from services.records import storage_commitment as stgcmt
from services.records.commitment_scp import CommitmentLoop, CommitmentSettings
from services.records.dimse import StoreSCP
from services.records.models import CommitmentRequest, RecordFile
from services.records.report_return import ReturnSettings, answer_commitment_result
from services.records.store import ObjectStore
from tests.dicom_factory import make_us_instance
from tests.infra import free_port
from tests.integration import test_records_retrieval as retrieval
from tests.integration.test_records_report_return import deliver, pdf_in_pacs, report_for
from tests.orthanc import Orthanc, running_orthanc

engine, client = retrieval.engine, retrieval.client  # the records service and its API, as fixtures
OPTIONS = ReturnSettings(
    attempts=2,
    backoff_seconds=0,
    timeout_seconds=5,
    held_recheck_seconds=0,
    commitment_timeout_seconds=30,
    commitment_linger_seconds=3,
)
ANSWERS = CommitmentSettings(attempts=2, backoff_seconds=0, timeout_seconds=5)
# No other module's image source names it. Its last character is a hex digit: the other PACS of this module end
# in letters past F instead (one ending in "D", for "drops", was PACS_AE itself once in 16 runs, and the
# commitment request found two sources of that AE at different ports).
PACS_AE = f"STGCMT{uuid.uuid4().hex[:6].upper()}"
STUDY = "1.2.826.0.1.3680043.10.7300"
HELD_STUDY = STUDY + ".2"  # its patient's birth date differs from the case's: held for a person's decision
PDF_STORAGE = "1.2.840.10008.5.1.4.1.1.104.1"
# A PACS that takes the C-STORE and then does not keep an Encapsulated PDF (a filter, a full disk, a purge).
DROPS_PDFS = f"""
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.SOPClassUID ~= '{PDF_STORAGE}'
end
"""


@pytest.fixture(scope="module")
def scp(engine: Engine, settings: Settings) -> Iterator[StoreSCP]:
    """Our SCP, taking commitment requests (kept for the answer pass) and results (for report returns)."""
    answers = CommitmentLoop(engine, settings, ANSWERS)  # never started: the tests run its passes
    handlers = answers.handlers(lambda event: answer_commitment_result(engine, event, OPTIONS))
    scp = StoreSCP(
        ObjectStore.for_settings(settings), free_port(), settings.max_upload_bytes, commitment=handlers
    )
    scp.start()
    try:
        yield scp
    finally:
        scp.stop()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, scp: StoreSCP) -> Iterator[Orthanc]:
    workdir = tmp_path_factory.mktemp("orthanc")
    files = []
    for index in range(2):
        path = workdir / f"IM{index}.dcm"
        make_us_instance(path, study_uid=STUDY, series_uid=STUDY + ".1")
        files.append(path)
    make_us_instance(
        workdir / "HELD.dcm", study_uid=HELD_STUDY, series_uid=HELD_STUDY + ".1", birth_date="19790101"
    )
    files.append(workdir / "HELD.dcm")
    with running_orthanc(workdir, scp_port=scp.port, ae_title=PACS_AE) as orthanc:
        orthanc.store(*files)
        yield orthanc


def eventually(check: Callable[[], Any], seconds: float = 10) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := check()):
        if time.monotonic() > deadline:
            raise AssertionError("not within the time allowed")
        time.sleep(0.1)
    return found


def committing_case(client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc, study: str) -> str:
    return returning_case(client, engine, settings, pacs, study, storage_commitment=True)


def returning_case(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc, study: str, **source: object
) -> str:
    """A case reading `study` whose partner's source (set after the case opened, so no retrieval is planned
    and none is left due) asks for reports back into `pacs`."""
    partner = f"clinic-stgcmt-{uuid.uuid4().hex[:8]}"
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=study)
    pacs_at = {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}
    retrieval.configure(client, partner, **pacs_at, **source, return_reports=True)
    return case_id


def returns_of(client: TestClient, case_id: str) -> list[dict[str, Any]]:
    return list(client.get(f"/v1/records/{case_id}").json()["report_returns"])


def test_a_report_sent_to_a_pacs_asked_for_commitment_is_done_once_the_pacs_commits_it(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    study = STUDY + ".10"
    case_id = committing_case(client, engine, settings, pacs, study)
    event, pdf = report_for(case_id, study)
    deliver(engine, settings, event)

    assert report_return.run_due(engine, settings, OPTIONS) == 1
    # Orthanc answers on an association of its own, to our SCP.
    [done] = eventually(lambda: [r for r in returns_of(client, case_id) if r["commitment"] == "committed"])
    assert (done["status"], done["attempts"], done["last_error"]) == ("done", 1, None)
    assert done["committed_at"] is not None
    assert pdf_in_pacs(pacs, study, event.sop_instance_uid) == pdf
    # Orthanc's own record of the transaction it answered, under the UID the API shows.
    jobs = httpx.get(f"{pacs.url}/jobs", params={"expand": ""}, auth=pacs.auth, timeout=10).json()
    answered = [j for j in jobs if j["Type"] == "StorageCommitmentScp"]
    assert done["commitment_transaction_uid"] in {j["Content"]["TransactionUid"] for j in answered}
    assert report_return.run_due(engine, settings, OPTIONS) == 0


def test_a_source_without_storage_commitment_is_done_when_stored_as_before(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc
) -> None:
    study = STUDY + ".11"
    case_id = returning_case(client, engine, settings, pacs, study)
    deliver(engine, settings, report_for(case_id, study)[0])
    assert report_return.run_due(engine, settings, OPTIONS) == 1
    [done] = returns_of(client, case_id)
    assert (done["status"], done["commitment"], done["commitment_transaction_uid"]) == ("done", None, None)


def test_storage_commitment_needs_a_dimse_pacs(client: TestClient) -> None:
    response = client.put(
        "/v1/records/sources/clinic-web-commit",
        json={"dicomweb_url": "http://127.0.0.1:9/dicom-web", "storage_commitment": True},
    )
    assert response.status_code == 422
    assert "storage_commitment applies to a DIMSE PACS" in response.text


def test_a_pacs_that_did_not_keep_the_report_gets_it_again_then_the_return_fails_saying_why(
    client: TestClient,
    engine: Engine,
    settings: Settings,
    scp: StoreSCP,
    tmp_path: Path,
) -> None:
    with running_orthanc(
        tmp_path, scp_port=scp.port, ae_title=PACS_AE[:-1] + "P", lua=DROPS_PDFS
    ) as dropping:
        study = STUDY + ".12"
        case_id = committing_case(client, engine, settings, dropping, study)
        deliver(engine, settings, report_for(case_id, study)[0])

        assert report_return.run_due(engine, settings, OPTIONS) == 1
        [again] = eventually(lambda: [r for r in returns_of(client, case_id) if r["status"] == "pending"])
        assert again["commitment"] == "not_committed"
        assert "(Failure Reason 0x0112, no such object instance); it is sent again" in again["last_error"]
        assert report_return.run_due(engine, settings, OPTIONS) == 1  # sent and asked again: the last attempt
        [failed] = eventually(lambda: [r for r in returns_of(client, case_id) if r["status"] == "failed"])
    assert (failed["commitment"], failed["attempts"]) == ("not_committed", 2)
    assert "did not commit the report instance (Failure Reason 0x0112" in failed["last_error"]
    assert "after 2 attempts" in failed["last_error"]
    assert report_return.run_due(engine, settings, OPTIONS) == 0


def test_a_pacs_that_never_answers_the_commitment_request_gets_the_report_again_then_it_fails(
    client: TestClient, engine: Engine, settings: Settings, tmp_path: Path
) -> None:
    quick = OPTIONS.model_copy(update={"commitment_timeout_seconds": 0.5, "commitment_linger_seconds": 0.1})
    # Its answer goes to an address where nothing listens: it never reaches us.
    with running_orthanc(tmp_path, scp_port=free_port(), ae_title=PACS_AE[:-1] + "M") as mute:
        study = STUDY + ".13"
        case_id = committing_case(client, engine, settings, mute, study)
        deliver(engine, settings, report_for(case_id, study)[0])
        assert report_return.run_due(engine, settings, quick) == 1
        [waiting] = returns_of(client, case_id)
        assert (waiting["status"], waiting["commitment"]) == ("running", "requested")
        time.sleep(0.6)
        assert report_return.run_due(engine, settings, quick) == 1  # timed out: sent and asked again
        time.sleep(0.6)
        assert report_return.run_due(engine, settings, quick) == 0  # timed out again, the last attempt
    [failed] = returns_of(client, case_id)
    assert (failed["status"], failed["commitment"], failed["attempts"]) == ("failed", "not_committed", 2)
    assert "the PACS sent no storage commitment result within 0.5 s, after 2 attempts" in failed["last_error"]


def retrieved(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc, scp: StoreSCP, study: str
) -> list[tuple[str, str]]:
    """C-MOVE the study from the PACS into a case; the SOP Class and Instance UIDs stored."""
    partner = f"clinic-sent-{uuid.uuid4().hex[:8]}"
    source = {
        "ae_title": pacs.ae_title,
        "host": "127.0.0.1",
        "port": pacs.dicom_port,
        "retrieve_method": "c-move",
    }
    retrieval.configure(client, partner, **source)
    case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=study)
    retrieval.retrieve(engine, settings, scp)  # (and any retrieval another module left due)
    [done] = client.get(f"/v1/records/{case_id}").json()["retrievals"]
    assert done["status"] == "done", done
    with Session(engine) as session:
        stored = session.exec(
            select(RecordFile.sop_class_uid, RecordFile.sop_instance_uid).where(RecordFile.case_id == case_id)
        ).all()
    return [(str(c), str(i)) for c, i in stored]


def ask_orthanc_to_request_commitment(pacs: Orthanc, instances: list[tuple[str, str]]) -> httpx.Response:
    return httpx.post(
        f"{pacs.url}/modalities/secondopinion/storage-commitment",
        json={"DicomInstances": [{"SOPClassUID": c, "SOPInstanceUID": i} for c, i in instances]},
        auth=pacs.auth,
        timeout=10,
    )


def test_a_pacs_that_sent_us_a_study_is_told_what_we_committed_and_what_we_do_not_hold(
    client: TestClient, engine: Engine, settings: Settings, pacs: Orthanc, scp: StoreSCP
) -> None:
    stored = retrieved(client, engine, settings, pacs, scp, STUDY)
    assert len(stored) == 2
    [held] = retrieved(client, engine, settings, pacs, scp, HELD_STUDY)  # stored, held for identity
    missing = (stored[0][0], str(pydicom.uid.generate_uid()))

    response = ask_orthanc_to_request_commitment(pacs, [*stored, held, missing])
    response.raise_for_status()
    transaction = response.json()["ID"]
    with Session(engine) as session:  # kept before we answer: a restart now would not lose it
        kept = session.get(CommitmentRequest, transaction)
        assert kept is not None and (kept.status, kept.calling_ae) == ("pending", pacs.ae_title)

    assert commitment_scp.run_due(engine, settings, ANSWERS) == 1
    report = eventually(
        lambda: (
            r
            if (
                r := httpx.get(
                    f"{pacs.url}/storage-commitment/{transaction}", auth=pacs.auth, timeout=10
                ).json()
            )["Status"]
            != "Pending"
            else None
        )
    )
    assert report["Status"] == "Failure"
    assert sorted(s["SOPInstanceUID"] for s in report["Success"]) == sorted(i for _, i in stored)
    failures = {f["SOPInstanceUID"]: f["FailureReason"] for f in report["Failures"]}
    assert failures == {missing[1]: 0x0112, held[1]: 0x0110}
    with Session(engine) as session:
        answered = session.get(CommitmentRequest, transaction)
        assert answered is not None and (answered.status, answered.committed, answered.failed) == (
            "done",
            2,
            2,
        )
    assert commitment_scp.run_due(engine, settings, ANSWERS) == 0


def test_a_pacs_no_image_source_names_is_refused_and_nothing_is_kept(
    engine: Engine, settings: Settings, scp: StoreSCP, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with running_orthanc(tmp_path, scp_port=scp.port, ae_title=PACS_AE[:-1] + "U") as unknown:
        response = ask_orthanc_to_request_commitment(unknown, [("1.2.840.10008.5.1.4.1.1.6.1", "1.2.3.4")])
    assert response.status_code >= 400, response.text  # Orthanc reports the N-ACTION refused
    assert "records.commitment_request_unknown_ae" in capsys.readouterr().out
    with Session(engine) as session:
        asked = session.exec(
            select(CommitmentRequest).where(CommitmentRequest.calling_ae == unknown.ae_title)
        ).all()
    assert asked == []
    assert commitment_scp.run_due(engine, settings, ANSWERS) == 0


class SameAssociationPacs:
    """A PACS that answers a commitment request on the requester's own association, as PS3.4 J.3.3 allows
    (neither Orthanc nor dcmtk does; pynetdicom plays it): it stores what it is sent, and once its N-ACTION
    response is out it sends the result on that association."""

    def __init__(self) -> None:
        self.stored: set[str] = set()
        self.ae = AE(ae_title="SAMEASSOC")
        self.ae.add_supported_context(EncapsulatedPDFStorage, ExplicitVRLittleEndian)
        self.ae.add_supported_context(stgcmt.STORAGE_COMMITMENT)
        self.port = free_port()
        self.server: Any = None
        self._pending: dict[int, Any] = {}

    def __enter__(self) -> SameAssociationPacs:
        handlers = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_N_ACTION, self._action),
            (evt.EVT_DIMSE_SENT, self._sent),
        ]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()

    def _store(self, event: Any) -> int:
        self.stored.add(str(event.request.AffectedSOPInstanceUID))
        return 0x0000

    def _action(self, event: Any) -> tuple[int, None]:
        transaction, references = stgcmt.read_request(event.action_information)
        committed = [r for r in references if r.sop_instance_uid in self.stored]
        self._pending[id(event.assoc)] = stgcmt.Result(transaction, committed, [])
        return 0x0000, None

    def _sent(self, event: Any) -> None:
        result = self._pending.pop(id(event.assoc), None)
        if result is None or type(event.message).__name__ != "N_ACTION_RSP":
            if result is not None:
                self._pending[id(event.assoc)] = result
            return
        assoc = event.assoc

        def report() -> None:
            event_type, information = stgcmt.result_dataset(result)
            assoc.send_n_event_report(
                information, event_type, stgcmt.STORAGE_COMMITMENT, stgcmt.WELL_KNOWN_INSTANCE
            )

        threading.Thread(target=report, daemon=True).start()


def test_a_result_sent_on_our_own_association_is_taken_there(
    client: TestClient, engine: Engine, settings: Settings
) -> None:
    with SameAssociationPacs() as peer:
        study = STUDY + ".14"
        partner = f"clinic-stgcmt-{uuid.uuid4().hex[:8]}"
        case_id = retrieval.open_case(engine, settings, partner, study_instance_uid=study)
        source = {"ae_title": "SAMEASSOC", "host": "127.0.0.1", "port": peer.port}
        retrieval.configure(client, partner, **source, return_reports=True, storage_commitment=True)
        event, _ = report_for(case_id, study)
        deliver(engine, settings, event)
        started = time.monotonic()
        assert report_return.run_due(engine, settings, OPTIONS) == 1
        assert time.monotonic() - started < OPTIONS.commitment_linger_seconds  # released once it came
    assert peer.stored == {event.sop_instance_uid}
    [done] = returns_of(client, case_id)
    assert (done["status"], done["commitment"]) == ("done", "committed")
