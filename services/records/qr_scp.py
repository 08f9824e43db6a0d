"""Query/Retrieve SCP on our SCP (AE SECONDOPINION) for a specialist's diagnostic workstation (Horos, OsiriX,
RadiAnt, a PACS viewer): Study Root and Patient Root C-FIND, C-GET and C-MOVE over the cases its principal
may see (a case is a patient, under our Patient ID).

Who may query is configured (RECORDS_QR_WORKSTATIONS, or operations' `PUT /v1/records/workstations/{ae}`,
workstations.py): each workstation's AE title is bound to one principal (a specialist, a partner or
operations) with the address it associates from (and on our TLS port, the client certificate's CN). An
association that proposes a Q/R context from any other calling AE or address is rejected (A-ASSOCIATE-RJ,
calling AE title not recognised); a facility's PACS sending C-STORE or storage commitment is not affected.

What it sees is what DICOMweb shows that principal: the released instances (none held for an identity
decision) of the cases it may see (`tenancy.may_see_case`: a specialist only the cases offered to or accepted
by them), with our identifiers (Patient ID, Issuer, Accession Number) coerced exactly as WADO-RS hands them out
(`reconcile.coerced_chunks`). Every C-FIND is one audit entry per case it answered from; every instance a C-GET
or C-MOVE sends is audited per read window, as a WADO-RS read (`read_windows`).

Statuses (PS3.4 C.4): a level the model does not have, or a retrieve naming no unique key of its level:
A900 (Identifier does not match SOP Class); more matches than RECORDS_QR_MAX_FIND_MATCHES: the first that many,
then A700 (Out of Resources) saying to narrow the query; C-CANCEL: FE00; a move destination that is not a
workstation bound to the same principal (a `tls` one, without our TLS client settings): A801; an identifier that cannot be read: C000 (Unable to process);
an exception in a handler is answered by pynetdicom with a failure status, the SCP's threads go on.
"""

from __future__ import annotations

import hashlib
import ipaddress
import ssl
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import pydicom
import structlog
from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from pydicom.dataset import Dataset
from pynetdicom import AE, build_context, evt
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from services.auth import audit
from services.auth.access import dicom_detail
from services.auth.models import CaseOwner, CaseReviewer, Role
from services.auth.read_windows import get_read_windows
from services.common.config import Settings
from services.records import dicom_tls
from services.records.dicomweb import _date_matches, _modified_at, _released, _text_matches
from services.records.models import DicomWorkstation, RecordFile, RecordRequest
from services.records.reconcile import coerced_chunks, coerced_header, our_identifiers
from services.records.store import ObjectStore

log = structlog.get_logger(__name__)

QR_FIND = StudyRootQueryRetrieveInformationModelFind
QR_GET = StudyRootQueryRetrieveInformationModelGet
QR_MOVE = StudyRootQueryRetrieveInformationModelMove
PATIENT_ROOT = (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
)
QR_CLASSES = (QR_FIND, QR_GET, QR_MOVE, *PATIENT_ROOT)
RESOURCE = "records.dicom-qr"
OUR_AE = "SECONDOPINION"

SUCCESS, PENDING, CANCELLED = 0x0000, 0xFF00, 0xFE00
OUT_OF_RESOURCES, DOES_NOT_MATCH_SOP_CLASS, UNABLE_TO_PROCESS = 0xA700, 0xA900, 0xC000
LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")  # the Study Root model has no PATIENT level
# The unique key of each level, and the index column that holds it (a patient is a case: our Patient ID).
UNIQUE_KEYS = {
    "PATIENT": ("PatientID", "case_id"),
    "STUDY": ("StudyInstanceUID", "study_instance_uid"),
    "SERIES": ("SeriesInstanceUID", "series_instance_uid"),
    "IMAGE": ("SOPInstanceUID", "sop_instance_uid"),
}
# VRs matched as text with wildcards; as ranges; as lists of UIDs (PS3.4 C.2.2.2).
RANGE_VRS = {"DA", "TM", "DT"}
NOT_MATCHED_VRS = {"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN"}
AE_TITLE = r"^[ -\[\]-~]{1,16}$"  # printable ASCII but backslash (PS3.5 AE)


class WorkstationBinding(BaseModel):
    """Where a workstation associates from, and the principal whose cases it sees."""

    host: str = Field(
        max_length=253, description="the IP address it associates from; a C-MOVE to it sends there"
    )
    port: int | None = Field(default=None, ge=1, le=65535, description="its C-STORE SCP, for a C-MOVE to it")
    tls: bool = Field(default=False, description="it may associate only on our DICOM TLS port")
    certificate_cn: str | None = Field(
        default=None, max_length=64, description="on the TLS port, the CN its client certificate must carry"
    )
    role: Literal["specialist", "partner", "operations"]
    specialist_id: str | None = Field(default=None, max_length=100)
    partner_id: str | None = Field(default=None, max_length=100)

    @field_validator("host")
    @classmethod
    def _an_address(cls, host: str) -> str:
        try:
            return str(ipaddress.ip_address(host))
        except ValueError:
            raise ValueError(
                "host is the IP address the workstation associates from (such as 10.1.2.3), not a name"
            ) from None

    @model_validator(mode="after")
    def _bound(self) -> WorkstationBinding:
        if self.role == "specialist" and not self.specialist_id:
            raise ValueError("a specialist's workstation needs specialist_id (whose cases it sees)")
        if self.role == "partner" and not self.partner_id:
            raise ValueError("a partner's workstation needs partner_id (whose cases it sees)")
        return self


class Workstation(WorkstationBinding):
    """A diagnostic workstation allowed to query and retrieve, bound to the principal whose cases it sees."""

    ae_title: str = Field(pattern=AE_TITLE)

    @property
    def principal(self) -> tuple[str, str | None, str | None]:
        return self.role, self.partner_id, self.specialist_id


class QueryRetrieveSettings(BaseSettings):
    """RECORDS_QR_WORKSTATIONS: a JSON list of workstations (see `Workstation`); none: Q/R is off."""

    model_config = SettingsConfigDict(env_prefix="RECORDS_QR_", extra="ignore")

    workstations: list[Workstation] = []
    max_find_matches: int = Field(default=500, ge=1)


@lru_cache
def get_qr_settings() -> QueryRetrieveSettings:
    return QueryRetrieveSettings()


@dataclass(frozen=True)
class Match:
    """One answer of a query: a study, a series or an instance of one case, and its instances."""

    case_id: str
    rows: list[RecordFile]


class QueryRetrieve:
    """The Q/R service of our SCP: contexts and handlers `StoreSCP` adds to its AE."""

    def __init__(
        self,
        records: Engine,
        auth: Engine,
        settings: Settings,
        options: QueryRetrieveSettings,
        move_tls: dicom_tls.ClientTls | None = None,
    ) -> None:
        """`move_tls`: how a C-MOVE reaches a `tls` workstation (our certificate, the CA that signed its)."""
        self._records, self._auth, self._options = records, auth, options
        self._move_tls = move_tls
        self._store = ObjectStore.for_settings(settings)
        self._configured = {w.ae_title: w for w in options.workstations}
        self._spool = settings.data_dir / "records" / "tmp"

    @staticmethod
    def add_contexts(ae: AE) -> None:
        """The Q/R models our SCP accepts, in pynetdicom's default transfer syntaxes."""
        for sop_class in QR_CLASSES:
            ae.add_supported_context(sop_class)

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_C_MOVE, self._on_move),
        ]

    # --- who may query ------------------------------------------------------------------------------

    def _on_requested(self, event: Any) -> None:
        """Reject an association proposing a Q/R context unless a configured workstation makes it."""
        assoc = event.assoc
        proposed = assoc.requestor.primitive.presentation_context_definition_list or []
        if not any(str(cx.abstract_syntax) in QR_CLASSES for cx in proposed):
            return
        refusal = self._refusal(assoc)
        if refusal is None:
            return
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        log.warning("records.qr_association_rejected", calling_ae=calling[:16], why=refusal)
        self._audit(None, calling, None, "denied", f"association rejected: {refusal}", assoc)
        # Rejected (permanent), by the service user: calling AE title not recognised.
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        # pynetdicom closes the socket once this returns: wait for the DUL thread to take the A-ASSOCIATE-RJ
        # (it leaves Sta3), and a moment for its write (without it the peer saw only the connection closed).
        deadline = time.monotonic() + 5
        while assoc.dul.state_machine.current_state == "Sta3" and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)

    def _refusal(self, assoc: Any) -> str | None:
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        station = self._station(calling)
        if station is None:
            return "the calling AE title is not a configured workstation"
        if assoc.requestor.address != station.host:
            return "the workstation associated from an address it is not configured with"
        peer = getattr(assoc.dul.socket, "socket", None)
        on_tls = isinstance(peer, ssl.SSLSocket)
        if station.tls and not on_tls:
            return "the workstation must associate on the DICOM TLS port"
        if station.certificate_cn is not None:
            cert: Any = peer.getpeercert() if isinstance(peer, ssl.SSLSocket) else None
            names = [v for rdn in (cert or {}).get("subject", ()) for k, v in rdn if k == "commonName"]
            if station.certificate_cn not in names:
                return "the client certificate is not the workstation's"
        return None

    def _station(self, ae_title: str) -> Workstation | None:
        """The workstation of this AE title: in RECORDS_QR_WORKSTATIONS, or as operations configured it."""
        if ae_title in self._configured:
            return self._configured[ae_title]
        with Session(self._records) as session:
            row = session.get(DicomWorkstation, ae_title)
            return Workstation.model_validate(row, from_attributes=True) if row is not None else None

    def _workstation(self, event: Any) -> Workstation:
        station = self._station(str(event.assoc.requestor.ae_title).strip())
        if station is None or self._refusal(event.assoc) is not None:
            raise PermissionError("not a configured workstation")  # rejected at association already
        return station

    # --- C-FIND -------------------------------------------------------------------------------------

    def _on_find(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        try:
            station = self._workstation(event)
            query = event.identifier
            level = _level(event, query)
        except Refused as exc:
            yield failure(exc.status, str(exc)), None
            return
        except Exception:
            yield failure(UNABLE_TO_PROCESS, "the query could not be read"), None
            return
        answered: dict[str, list[str]] = {}
        sent = 0
        try:
            for match, answer in self._answers(station, query, level):
                if event.is_cancelled:
                    yield CANCELLED, None
                    break
                if sent == self._options.max_find_matches:
                    yield (
                        failure(
                            OUT_OF_RESOURCES,
                            f"more than {sent} matches: narrow the query (a date range, a patient)",
                        ),
                        None,
                    )
                    break
                sent += 1
                answered.setdefault(match.case_id, []).append(_uid_of(match, level))
                yield PENDING, answer
            else:
                yield SUCCESS, None
        finally:
            for case_id, uids in answered.items():
                detail = f"C-FIND {level}: {len(uids)} answered: " + " ".join(dict.fromkeys(uids))
                self._audit(station, station.ae_title, case_id, "success", detail, event.assoc)

    def _answers(self, station: Workstation, query: Dataset, level: str) -> Iterator[tuple[Match, Dataset]]:
        for match in self._matches(station, query, level):
            answer = self._answer(match, query, level)
            if answer is not None:
                yield match, answer

    def _matches(self, station: Workstation, query: Dataset, level: str) -> Iterator[Match]:
        """Each study, series or instance of the cases `station` may see that the query's UIDs allow."""
        where = {
            column: _uid_list(query, keyword)
            for lvl, (keyword, column) in UNIQUE_KEYS.items()
            if 0 < LEVELS.index(lvl) <= LEVELS.index(level)
        }
        for case_id in self._visible_cases(station):
            with Session(self._records) as session:
                rows = _released(
                    session,
                    case_id,
                    study_instance_uid=where.get("study_instance_uid"),
                    series_instance_uid=where.get("series_instance_uid"),
                    sop_instance_uid=where.get("sop_instance_uid"),
                )
            groups: dict[str, list[RecordFile]] = {}
            column = UNIQUE_KEYS[level][1]
            for row in rows:
                groups.setdefault(str(getattr(row, column)), []).append(row)
            for members in groups.values():
                yield Match(case_id, members)

    def _visible_cases(self, station: Workstation) -> list[str]:
        """The cases the workstation's principal may see that have records, as tenancy.may_see_case decides."""
        with Session(self._auth) as auth:
            if station.role == "specialist":
                cases = auth.exec(
                    select(CaseReviewer.case_id).where(CaseReviewer.specialist_id == station.specialist_id)
                ).all()
            elif station.role == "partner":
                cases = auth.exec(
                    select(CaseOwner.case_id).where(CaseOwner.partner_id == station.partner_id)
                ).all()
            else:
                cases = None
        with Session(self._records) as session:
            query = select(RecordRequest.case_id)
            if cases is not None:
                query = query.where(col(RecordRequest.case_id).in_(list(cases)))
            return sorted(session.exec(query).all())

    def _answer(self, match: Match, query: Dataset, level: str) -> Dataset | None:
        """The response identifier for `match` (each key the query names, with our value), or None when a
        matching key does not match. Computed values (counts, modalities, our identifiers) are checked
        first; the header (as we hand it out) is read only when they match."""
        computed = self._computed(match, level)
        if not _matches(query, computed, complete=False):
            return None
        row = match.rows[0]
        header = self._handed_out_header(match.case_id, row)
        for element in computed:
            header[element.tag] = element
        if not _matches(query, header):
            return None
        answer = Dataset()
        if "SpecificCharacterSet" in header:
            answer.SpecificCharacterSet = header.SpecificCharacterSet
        for element in query:
            if element.tag == 0x00080005:
                continue
            if element.keyword == "QueryRetrieveLevel":
                answer.QueryRetrieveLevel = level
            elif element.tag in header and element.VR == header[element.tag].VR:
                answer[element.tag] = header[element.tag]
            else:
                answer.add_new(element.tag, element.VR, None)
        answer.QueryRetrieveLevel = level
        # The unique keys of this level and those above it, asked for or not (PS3.4 C.4.1.2.3).
        for keyword, _ in list(UNIQUE_KEYS.values())[: LEVELS.index(level) + 1]:
            if keyword not in answer and keyword in header:
                answer[keyword] = header[keyword]
        answer.RetrieveAETitle = OUR_AE
        return answer

    def _computed(self, match: Match, level: str) -> Dataset:
        rows = match.rows
        with Session(self._records) as session:
            request = session.get(RecordRequest, match.case_id)
            exam = dict(request.exam) if request is not None else {}
        ids = our_identifiers(match.case_id, exam)
        data = Dataset()
        data.PatientID = ids["PatientID"]
        data.IssuerOfPatientID = ids["IssuerOfPatientID"]
        if level == "PATIENT":
            data.NumberOfPatientRelatedStudies = len({r.study_instance_uid for r in rows})
            data.NumberOfPatientRelatedSeries = len({r.series_instance_uid for r in rows})
            data.NumberOfPatientRelatedInstances = len(rows)
            return data
        data.AccessionNumber = ids["AccessionNumber"]
        data.StudyInstanceUID = rows[0].study_instance_uid
        date = next((r.study_date for r in rows if r.study_date), None)
        data.StudyDate = date or ""
        data.InstanceAvailability = "ONLINE"
        if level == "STUDY":
            data.ModalitiesInStudy = sorted({str(r.modality) for r in rows if r.modality})
            data.NumberOfStudyRelatedSeries = len({r.series_instance_uid for r in rows})
            data.NumberOfStudyRelatedInstances = len(rows)
        else:
            data.SeriesInstanceUID = rows[0].series_instance_uid
            data.Modality = rows[0].modality or ""
        if level == "SERIES":
            data.NumberOfSeriesRelatedInstances = len(rows)
        if level == "IMAGE":
            data.SOPInstanceUID = rows[0].sop_instance_uid
            data.SOPClassUID = rows[0].sop_class_uid or ""
        return data

    def _handed_out_header(self, case_id: str, row: RecordFile) -> Dataset:
        with Session(self._records) as session:
            request = session.get(RecordRequest, case_id)
            ids = our_identifiers(case_id, dict(request.exam) if request is not None else {})
            modified_at = _modified_at(session, row)
        path = self._store.local_path(row.storage_path, row.sha256)
        return coerced_header(path, ids, modified_at)

    # --- C-GET and C-MOVE ---------------------------------------------------------------------------

    def _on_get(self, event: Any) -> Iterator[Any]:
        try:
            station = self._workstation(event)
            level, instances = self._retrieved(event, station)
        except Refused as exc:
            yield 1
            yield failure(exc.status, str(exc)), None
            return
        yield len(instances)
        yield from self._send(event, station, level, instances, "C-GET")

    def _on_move(self, event: Any) -> Iterator[Any]:
        station = self._workstation(event)
        named = event.move_destination
        named = (named.decode("ascii", "replace") if isinstance(named, bytes) else str(named)).strip()
        destination = self._station(named)
        if (
            destination is None
            or destination.port is None
            or destination.principal != station.principal
            or (destination.tls and self._move_tls is None)  # no TLS client: it retrieves with C-GET
        ):
            # Never an address the request claims: only a workstation bound to the same principal.
            log.info("records.qr_move_destination_refused")
            detail = f"C-MOVE to {named[:16]!r} refused: not a workstation of this principal with a port"
            self._audit(station, station.ae_title, None, "denied", detail, event.assoc)
            yield None, None
            return
        try:
            level, instances = self._retrieved(event, station)
        except Refused as exc:
            yield destination.host, destination.port
            yield 1
            yield failure(exc.status, str(exc)), None
            return
        contexts = list(
            dict.fromkeys(
                (str(r.sop_class_uid), syntax)
                for _, r in instances
                if (syntax := self._syntax(r)) is not None
            )
        )[:128]
        sending: dict[str, Any] = {"contexts": [build_context(c, s) for c, s in contexts]}
        if destination.tls and self._move_tls is not None:
            sending["tls_args"] = (self._move_tls.context(), destination.host)
        yield destination.host, destination.port, sending
        yield len(instances)
        yield from self._send(event, station, level, instances, f"C-MOVE to {destination.ae_title}")

    def _retrieved(self, event: Any, station: Workstation) -> tuple[str, list[tuple[str, RecordFile]]]:
        """The level and the (case, instance) pairs a C-GET or C-MOVE asks for, among those the station sees:
        the unique key of its level given, each key given (such as the Patient ID) matching."""
        try:
            identifier = event.identifier
            level = _level(event, identifier)
        except Refused:
            raise
        except Exception:
            raise Refused(UNABLE_TO_PROCESS, "the identifier could not be read") from None
        if not _uid_list(identifier, UNIQUE_KEYS[level][0]):
            raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"a {level} retrieve names its {UNIQUE_KEYS[level][0]}")
        return level, [
            (match.case_id, row)
            for match in self._matches(station, identifier, level)
            if _matches(identifier, self._computed(match, level), complete=False)
            for row in match.rows
        ]

    def _syntax(self, row: RecordFile) -> str | None:
        try:
            path = self._store.local_path(row.storage_path, row.sha256)
            meta = pydicom.filereader.read_file_meta_info(path)
            return str(meta.TransferSyntaxUID)
        except Exception:
            return None

    def _send(
        self,
        event: Any,
        station: Workstation,
        level: str,
        instances: list[tuple[str, RecordFile]],
        operation: str,
    ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """Each instance as WADO-RS hands it out (coerced), audited per read window before it is sent."""
        windows = get_read_windows()
        reader = "@" + hashlib.sha256(station.ae_title.encode()).hexdigest()[:15]
        for case_id, row in instances:
            if event.is_cancelled:
                yield CANCELLED, None
                return
            uids = {
                "study": str(row.study_instance_uid),
                "series": str(row.series_instance_uid),
                "sop": str(row.sop_instance_uid),
            }
            detail = (
                f"{dicom_detail(uids)}; {operation} at {level} level; this workstation's further reads of "
                f"the instance in this {windows.seconds:g} s window are this entry"
            )
            windows.enter(
                self._auth, (reader, case_id, uids["sop"]), self._entry(station, case_id, detail, event.assoc)
            )
            yield PENDING, self._handed_out(case_id, row)

    def _handed_out(self, case_id: str, row: RecordFile) -> Dataset:
        """The instance as WADO-RS hands it out: the same coerced bytes, read back as a dataset to send."""
        with Session(self._records) as session:
            request = session.get(RecordRequest, case_id)
            ids = our_identifiers(case_id, dict(request.exam) if request is not None else {})
            modified_at = _modified_at(session, row)
        path = self._store.local_path(row.storage_path, row.sha256)
        self._spool.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=self._spool) as spooled:
            for chunk in coerced_chunks(path, ids, modified_at):
                spooled.write(chunk)
            spooled.seek(0)
            return pydicom.dcmread(spooled)

    # --- audit --------------------------------------------------------------------------------------

    def _entry(
        self, station: Workstation | None, case_id: str | None, detail: str, assoc: Any
    ) -> audit.EntryFields:
        calling = station.ae_title if station else ""
        return audit.EntryFields(
            actor=f"dicom-ae:{calling}"[:100],
            partner_id=station.partner_id if station else None,
            role=Role(station.role).value if station else None,
            service="records",
            action="read",
            resource=RESOURCE,
            case_id=case_id,
            outcome="success",
            detail=detail,
            network_address=str(assoc.requestor.address or "")[:64] or None,
        )

    def _audit(
        self,
        station: Workstation | None,
        calling: str,
        case_id: str | None,
        outcome: str,
        detail: str,
        assoc: Any,
    ) -> None:
        entry = self._entry(station, case_id, detail, assoc)
        entry["actor"] = f"dicom-ae:{calling}"[:100]
        entry["outcome"] = outcome
        try:
            audit.record(self._auth, **entry)
        except Exception as exc:
            log.error("records.qr_audit_failed", error=type(exc).__name__)


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _level(event: Any, identifier: Dataset) -> str:
    """The identifier's Query/Retrieve Level, one of its information model's (A900 otherwise)."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip()
    patient_root = str(event.context.abstract_syntax) in PATIENT_ROOT
    levels = LEVELS if patient_root else LEVELS[1:]
    if level not in levels:
        raise Refused(DOES_NOT_MATCH_SOP_CLASS, f"QueryRetrieveLevel is one of {', '.join(levels)}")
    return level


def failure(status: int, comment: str) -> Dataset:
    """A failure status with an Error Comment (64 characters, no PHI) saying what to do."""
    data = Dataset()
    data.Status = status
    data.ErrorComment = comment[:64]
    return data


def _uid_of(match: Match, level: str) -> str:
    return str(getattr(match.rows[0], UNIQUE_KEYS[level][1]))


def _uid_list(query: Dataset, keyword: str) -> str | None:
    """A UID key's values as the index filter takes them (separated by backslashes); None: universal."""
    uids = [uid for uid in _values(query.get(keyword)) if uid]
    return "\\".join(uids) or None


def _matches(query: Dataset, candidate: Dataset, *, complete: bool = True) -> bool:
    """Whether each matching key of `query` present in `candidate` matches it (PS3.4 C.2.2.2): single value
    and wildcard (* ?; person names regardless of case), UID lists, date and time ranges, a list of values (any); an empty key is universal. An
    attribute the entity lacks matches no value, unless `candidate` is not `complete` (the computed part)."""
    for element in query:
        if element.tag in (0x00080005, 0x00080052) or element.VR in NOT_MATCHED_VRS:
            continue
        if element.value in (None, "", b""):
            continue
        if element.tag not in candidate:
            if complete:
                return False
            continue
        wanted = _values(element.value)
        have = _values(candidate[element.tag].value)
        if element.VR == "UI":
            ok = bool(set(wanted) & set(have))
        elif element.VR in RANGE_VRS:
            ok = any(_date_matches(h, w) for w in wanted for h in have)
        elif element.VR == "PN":  # case-insensitive, as PS3.4 C.2.2.2.1 and C.2.2.2.4 allow for names
            ok = any(_text_matches(h, w, ignore_case=True) for w in wanted for h in have)
        else:
            ok = any(_text_matches(h, w) for w in wanted for h in have)
        if not ok:
            return False
    return True


def _values(value: Any) -> list[str]:
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [str(v) for v in value]
    return [] if value is None else [str(value)]
