"""`python -m scripts.conformance_statement [--check]`: writes docs/dicom-conformance-statement.md from the code.

Every SOP class, transfer syntax, status, timeout, setting name and media type in the statement is read from
the modules that use it (the SCP's AE is built by the very function the records process builds it with,
`dimse.scp_ae`; the C-GET's contexts by `dimse.add_get_contexts`); prose says only how they behave. So the
statement cannot drift from the code unnoticed: tests/unit/test_conformance_statement.py fails when the file
checked in is not what this writes, and tests/integration/test_conformance_statement_scp.py checks the SCP
classes against a real association. `--check` exits 1 when the file is stale instead of writing it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import pydicom.charset
import pynetdicom
from fastapi.routing import APIRoute
from pydicom.uid import UID
from pynetdicom import AE, DEFAULT_TRANSFER_SYNTAXES
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from services.records import (
    commitment_scp,
    deidentify,
    dicom_tls,
    dicomweb,
    dimse,
    qr_scp,
    rendered,
    rendering,
    report_return,
    stow,
    video,
    wado_uri,
)
from services.records import storage_commitment as stgcmt
from services.records.qr_scp import QueryRetrieve, QueryRetrieveSettings
from services.records.retrieval import RetrievalSettings
from services.review import encapsulated_pdf

STATEMENT = Path(__file__).resolve().parent.parent / "docs" / "dicom-conformance-statement.md"
COMMAND = "python -m scripts.conformance_statement"


def scp_ae() -> AE:
    """Our SCP's AE as the records process starts it (storage commitment and Q/R on: main.py passes both)."""
    return dimse.scp_ae(commitment=True, add_query_retrieve=QueryRetrieve.add_contexts)


def scp_contexts() -> list[PresentationContext]:
    """The presentation contexts our SCP accepts: what the statement lists, and what the test proposes."""
    return list(scp_ae().supported_contexts)


def get_contexts() -> list[PresentationContext]:
    """The presentation contexts our C-GET proposes to a facility's PACS."""
    ae = AE(ae_title=dimse.OUR_AE)
    dimse.add_get_contexts(ae)
    return list(ae.requested_contexts)


def _name(uid: str) -> str:
    name = UID(uid).name
    return "" if name == uid else name.replace("|", "/")


def _hex(code: int) -> str:
    return f"{int(code):04X}H"


def _default(settings: type[Any], field: str) -> Any:
    return settings.model_fields[field].default


def _env(settings: type[Any], field: str, value: str = "") -> str:
    name = f"{settings.model_config.get('env_prefix', '')}{field}".upper()
    return f"`{name}={value}`" if value else f"`{name}`"


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _classes(uids: Iterable[str]) -> list[str]:
    return _table(("SOP Class", "UID"), ((_name(u), f"`{u}`") for u in uids))


def _syntaxes(uids: Iterable[str]) -> list[str]:
    return _table(("Transfer Syntax", "UID"), ((_name(u), f"`{u}`") for u in uids))


def _roles(cx: PresentationContext) -> str:
    if cx.scu_role and cx.scp_role:
        return "SCP; SCU or SCP when the requestor proposes SCP/SCU Role Selection"
    return "SCP (no role selection)"


def _scp_groups() -> list[tuple[tuple[str, ...], str, list[str]]]:
    """The SCP's contexts grouped by what they accept: (transfer syntaxes, roles, SOP classes)."""
    groups: dict[tuple[tuple[str, ...], str], list[str]] = {}
    for cx in scp_contexts():
        key = (tuple(str(s) for s in cx.transfer_syntax), _roles(cx))
        groups.setdefault(key, []).append(str(cx.abstract_syntax))
    return [(syntaxes, roles, classes) for (syntaxes, roles), classes in groups.items()]


def _get_groups() -> list[tuple[tuple[str, ...], list[str]]]:
    """The C-GET's proposed classes grouped by the transfer syntaxes proposed for each (over all contexts)."""
    by_class: dict[str, list[str]] = {}
    for cx in get_contexts():
        by_class.setdefault(str(cx.abstract_syntax), []).extend(str(s) for s in cx.transfer_syntax)
    groups: dict[tuple[str, ...], list[str]] = {}
    for sop_class, syntaxes in by_class.items():
        groups.setdefault(tuple(dict.fromkeys(syntaxes)), []).append(sop_class)
    return list(groups.items())


def render() -> str:
    lines: list[str] = []
    for part in (
        _front,
        _overview,
        _model,
        _scp,
        _scu,
        _network,
        _dicomweb,
        _media,
        _character_sets,
        _security,
        _identification,
    ):
        lines += part()
    return "\n".join(lines).rstrip() + "\n"


def _front() -> list[str]:
    return [
        "# DICOM Conformance Statement: secondopinion records service",
        "",
        f"<!-- Generated by `{COMMAND}` from the code; do not edit by hand. -->",
        "",
        "Structured after DICOM PS3.2 (Conformance). Every UID, transfer syntax, status, setting and media type",
        f"below is read from the code that uses it (`scripts/conformance_statement.py`); run `{COMMAND}`",
        "after changing any of them (a test fails until the file is regenerated). The IHE profiles the platform",
        "implements are in [ihe-integration-statement.md](ihe-integration-statement.md).",
        "",
        f"Built with pynetdicom {pynetdicom.__version__} and pydicom {pydicom.__version__}.",
        "",
    ]


def _overview() -> list[str]:
    lines = ["## 1 Overview", "", "### 1.1 Network services", ""]
    storage = [c for _, _, classes in _scp_groups() for c in classes if c != stgcmt.STORAGE_COMMITMENT]
    storage = [c for c in storage if c not in qr_scp.QR_CLASSES and c != Verification]
    rows = [
        ("Verification", "No", "Yes"),
        (
            f"Storage ({len(storage)} SOP classes)",
            "Yes: the report (Encapsulated PDF) back to a facility's PACS; instances to a workstation's "
            "C-GET or C-MOVE",
            "Yes: only instances a C-MOVE of ours awaits",
        ),
        ("Storage Commitment Push Model", "Yes (for the report we send)", "Yes (for what a PACS sent us)"),
        (
            "Study Root Query/Retrieve: FIND, GET, MOVE",
            "Yes (towards a facility's PACS)",
            "Yes (workstations)",
        ),
        ("Patient Root Query/Retrieve: FIND, GET, MOVE", "No", "Yes (workstations)"),
    ]
    lines += _table(("SOP classes", "User of Service (SCU)", "Provider of Service (SCP)"), rows)
    lines += [
        "### 1.2 DICOMweb services (PS3.18)",
        "",
        *_table(
            ("Service", "User agent", "Origin server"),
            [
                ("STOW-RS", "Yes (the report to a DICOMweb PACS)", "Yes"),
                ("QIDO-RS", "Yes (finding a study on a DICOMweb PACS)", "Yes"),
                ("WADO-RS (instances, metadata, frames, rendered, thumbnail)", "Yes (retrieving it)", "Yes"),
                ("WADO-URI", "No", "Yes"),
            ],
        ),
        "### 1.3 Media services (PS3.11, PS3.12)",
        "",
        *_table(
            ("Media Storage Application Profile", "File-set Reader (FSR)", "File-set Creator (FSC)"),
            [
                (
                    "A General Purpose profile's File-set (STD-GEN-CD, STD-GEN-DVD-*, STD-GEN-USB-*), its "
                    "files uploaded as a folder or a ZIP",
                    "Yes (the DICOMDIR selects the instances)",
                    "No",
                ),
                ("De-identified export (a ZIP file holding a File-set)", "No", "Yes (not on physical media)"),
            ],
        ),
    ]
    return lines


def _model() -> list[str]:
    ae = f"`{dimse.OUR_AE}`"
    return [
        "## 2 Implementation model",
        "",
        f"One Application Entity, {ae}, in the records service process (`services/records/main.py`): the SCP",
        "listens for the whole life of the process; the SCU side runs in three background loops of that process,",
        "each one association at a time.",
        "",
        "- **Retrieval** (the records of a case, from the referring facility's PACS): C-FIND at STUDY level, then",
        "  C-GET (the instances arrive on the same association) or C-MOVE to our own SCP, as the facility's image",
        "  source says (`retrieve_method`). A facility with a DICOMweb URL is asked by QIDO-RS and WADO-RS instead.",
        "  Each instance is spooled to disk as it arrives, its header checked, then imported and reconciled with",
        "  the case's patient (released, or held for a person's identity decision).",
        "- **Report return**: each version of the second-opinion report (an Encapsulated PDF placed into the",
        "  study it reads) is C-STOREd to the facility's PACS (or STOW-RS'd), when its source asks for reports;",
        "  with `storage_commitment` its commitment is then requested (N-ACTION) on the same association.",
        "- **Storage commitment answers**: a facility's PACS that asked us to commit what it sent is answered",
        "  (N-EVENT-REPORT) on an association we open to it.",
        "- **Query/Retrieve SCP** for configured diagnostic workstations: C-FIND, C-GET and C-MOVE over the",
        "  released instances of the cases the workstation's principal may see, sent as WADO-RS hands them out.",
        "- **DICOMweb** (the records service's HTTP API, under `/dicomweb`): STOW-RS into the same import path as",
        "  uploads, QIDO-RS, WADO-RS and WADO-URI over what was imported and released, scoped to one case.",
        "- **Media**: a CD's content uploaded as a folder or a ZIP is read through its DICOMDIR; the de-identified",
        "  export writes a File-set with a DICOMDIR into a ZIP.",
        "",
        "Instances are stored as received, in the transfer syntax they came in, and the network services send",
        "them in that syntax (none is transcoded); only the de-identified export writes a compressed image it",
        "cleaned uncompressed (Explicit VR Little Endian, a lossy source still flagged as lossy). What is handed",
        "out carries our Patient ID, Issuer and Accession Number (IHE IRWF).",
        "",
    ]


def _scp() -> list[str]:
    ae = scp_ae()
    retrieval = RetrievalSettings
    qr = QueryRetrieveSettings
    lines = [
        f"## 3 AE `{dimse.OUR_AE}` as SCP",
        "",
        "### 3.1 AE title and listeners",
        "",
        f"- AE title `{dimse.OUR_AE}` (fixed). Called AE title checked: {'yes' if ae.require_called_aet else 'no'}.",
        f"- Plain TCP on {_env(retrieval, 'scp_host')} (default `{_default(retrieval, 'scp_host')}`) port "
        f"{_env(retrieval, 'scp_port')} (default {_default(retrieval, 'scp_port')}); off with "
        f"{_env(retrieval, 'scp_plain', 'false')}.",
        f"- DICOM TLS on {_env(retrieval, 'scp_tls_port')} (none by default; 2762 by convention) with "
        f"{_env(retrieval, 'scp_tls_cert_path')} and {_env(retrieval, 'scp_tls_key_path')}; "
        f"{_env(retrieval, 'scp_tls_client_ca_path')} requires a client certificate that CA signed.",
        "",
        "### 3.2 SOP classes accepted",
        "",
        "Each group below lists the abstract syntaxes accepted and the transfer syntaxes accepted for each of",
        "them, in our order of preference: of those a presentation context proposes, the first in this order",
        "is accepted.",
        "",
    ]
    for n, (syntaxes, roles, classes) in enumerate(_scp_groups(), start=1):
        lines += [f"#### 3.2.{n} {len(classes)} SOP class{'es' if len(classes) > 1 else ''}: {roles}", ""]
        lines += _classes(classes)
        lines += ["Transfer syntaxes accepted:", ""]
        lines += _syntaxes(syntaxes)
    lines += [
        "Any other abstract syntax is rejected (A-ASSOCIATE-AC result: abstract syntax not supported), and any",
        "other transfer syntax for a listed class (result: transfer syntaxes not supported).",
        "",
        "### 3.3 Association policies",
        "",
        f"- Maximum PDU size received: {dimse.MAX_PDU_BYTES} bytes (`dimse.MAX_PDU_BYTES`).",
        f"- Associations at once: {ae.maximum_associations} accepted (on all listeners together); another is "
        "rejected (A-ASSOCIATE-RJ: rejected-transient, service-provider presentation, local limit exceeded).",
        f"- Timeouts: ACSE {ae.acse_timeout:g} s, DIMSE {ae.dimse_timeout:g} s, network (idle) "
        f"{ae.network_timeout:g} s.",
        "- Calling AE titles: an association proposing any Query/Retrieve class is accepted only from a "
        f"configured workstation ({_env(qr, 'workstations')}, or `PUT /v1/records/workstations/{{ae_title}}`): its "
        "calling AE title, from its configured IP address, on the TLS port when it is a `tls` one, with the "
        "client certificate CN configured. Any other is rejected: A-ASSOCIATE-RJ rejected-permanent, "
        "service-user, calling AE title not recognised (and audited as denied). Associations proposing no "
        "Query/Retrieve class (C-ECHO, C-STORE, storage commitment) are accepted from any calling AE title; "
        "what they may do is decided per message below.",
        "- User Identity negotiation is not used (a request for it is ignored); asynchronous operations are not "
        "negotiated (one operation at a time per association).",
        "",
        "### 3.4 Extended negotiation",
        "",
        "No SOP Class Extended Negotiation is answered: relational queries, combined date-time matching, fuzzy "
        "semantic matching of person names and timezone query adjustment are not supported (a requestor that "
        "asks gets no extended negotiation reply, which means not supported). SCP/SCU Role Selection is "
        "accepted for the classes so marked in 3.2.",
        "",
    ]
    lines += _scp_services()
    return lines


def _scp_services() -> list[str]:
    qr = QueryRetrieveSettings
    levels = ", ".join(qr_scp.LEVELS)
    unique = ", ".join(f"{level}: {keyword}" for level, (keyword, _) in qr_scp.UNIQUE_KEYS.items())
    failure_reasons = [
        (
            stgcmt.NO_SUCH_OBJECT_INSTANCE,
            "no file of that SOP Instance UID in a case of this PACS's partner(s)",
        ),
        (stgcmt.CLASS_INSTANCE_CONFLICT, "stored under another SOP Class UID"),
        (stgcmt.PROCESSING_FAILURE, "stored but held for a person's identity decision (IHE IRWF)"),
    ]
    return [
        "### 3.5 Verification SCP",
        "",
        "C-ECHO from any calling AE is answered with Success.",
        "",
        "### 3.6 Storage SCP",
        "",
        "Our SCP is the destination of our own C-MOVEs: it keeps an instance only when a C-MOVE of ours is "
        "waiting for its study (by Study Instance UID). The association is accepted for every storage class of "
        "3.2 (the standard ones; no private SOP class), so a PACS's sub-operation of a class we did not expect "
        "does not fail the whole C-MOVE. Each instance is "
        "stored as received (same transfer syntax, same bytes), spooled to disk as it arrives.",
        "",
        *_table(
            ("Status", "Meaning here"),
            [
                (_hex(dimse.SUCCESS), "stored"),
                (
                    _hex(dimse.NOT_AUTHORIZED),
                    "no retrieval of ours is waiting for this study (no unsolicited images)",
                ),
                (_hex(dimse.CANNOT_UNDERSTAND), "not a readable DICOM instance, or no Study Instance UID"),
                (
                    _hex(dimse.DOES_NOT_MATCH_SOP_CLASS),
                    "the header lacks what every stored instance needs, or its SOP Class/Instance UID is not the "
                    "request's",
                ),
                (_hex(dimse.OUT_OF_RESOURCES), "larger than the import limit, or it could not be written"),
            ],
        ),
        "A refused instance carries an Error Comment saying why (never a value from the instance); the rest of "
        "the study is kept.",
        "",
        "### 3.7 Query/Retrieve SCP (configured workstations)",
        "",
        "What a workstation sees is what DICOMweb shows its principal: the released instances of the cases it "
        "may see, one patient per case under our Patient ID, with our identifiers coerced as WADO-RS hands them "
        "out. Every C-FIND, and every instance sent, is audited.",
        "",
        f"- Levels: {levels} (PATIENT only in Patient Root). Unique keys: {unique}.",
        "- Matching on any key of the identifier (PS3.4 C.2.2.2): single value, wildcard `*` and `?` "
        "(case-sensitive, except on person names: PN keys match regardless of case, as PS3.4 C.2.2.2.1 and "
        "C.2.2.2.4 allow; no fuzzy semantic matching is negotiated), UID list, range matching on "
        f"{', '.join(sorted(qr_scp.RANGE_VRS))}, several values separated by `\\` (any matches), universal "
        f"(empty) matching. Keys of VR {', '.join(sorted(qr_scp.NOT_MATCHED_VRS))} are not matched. Hierarchical "
        "queries only (no relational queries).",
        "- Return keys: every key of the identifier, with our value (empty when we have none), from the "
        "instance's header as handed out or what we compute (Number of Study Related Series/Instances, "
        "Modalities in Study, Instance Availability ONLINE, ...); the unique keys of the level and those above "
        f"it always; Retrieve AE Title `{qr_scp.OUR_AE}`.",
        f"- At most {_default(qr, 'max_find_matches')} matches ({_env(qr, 'max_find_matches')}) are answered.",
        "- C-GET sends on the requestor's association (it proposes the storage classes with the SCP role); "
        "C-MOVE only to a destination AE configured as a workstation of the same principal with a `port` "
        "(never an address the request names); to a `tls` one over DICOM TLS. Instances are sent in the "
        "transfer syntax they were stored in (none is transcoded).",
        "",
        *_table(
            ("Status", "Meaning here"),
            [
                (_hex(qr_scp.PENDING), "a match (C-FIND) or a sub-operation (C-GET, C-MOVE) follows"),
                (_hex(qr_scp.SUCCESS), "done"),
                (_hex(qr_scp.CANCELLED), "C-CANCEL received"),
                (
                    _hex(qr_scp.OUT_OF_RESOURCES),
                    f"more matches than {_env(qr, 'max_find_matches')}: narrow the query (after the first that many)",
                ),
                (
                    _hex(qr_scp.DOES_NOT_MATCH_SOP_CLASS),
                    "a level the model does not have, or a retrieve naming no unique key of its level",
                ),
                ("A801H", "C-MOVE destination is not a workstation of this principal with a port"),
                (_hex(qr_scp.UNABLE_TO_PROCESS), "the identifier could not be read"),
            ],
        ),
        "### 3.8 Storage Commitment SCP (Push Model)",
        "",
        f"N-ACTION (Action Type {stgcmt.REQUEST_COMMITMENT}) on the well-known instance "
        f"`{stgcmt.WELL_KNOWN_INSTANCE}` from a PACS whose calling AE title is an image source's `ae_title` "
        f"(else {_hex(stgcmt.NOT_AUTHORIZED)}). The request is kept in the database before the N-ACTION is "
        f"answered; at most {commitment_scp.MAX_REFERENCES} instances in one (more: "
        f"{_hex(commitment_scp.RESOURCE_LIMITATION)}). The result is an N-EVENT-REPORT (Event Type "
        f"{stgcmt.ALL_COMMITTED}: all committed, {stgcmt.FAILURES_EXIST}: failures exist) always on a new "
        "association we open to that image source's host and port, proposing the SCP role (never an address "
        "the request claims), retried with backoff while the PACS cannot be reached.",
        "",
        *_table(("Failure Reason", "When"), ((_hex(code), why) for code, why in failure_reasons)),
        "N-EVENT-REPORTs sent to us for a report we asked to commit are accepted on this SCP as well (either "
        "role).",
        "",
    ]


def _scu() -> list[str]:
    retrieval, returns, commitment = (
        RetrievalSettings,
        report_return.ReturnSettings,
        commitment_scp.CommitmentSettings,
    )
    query_forms = [
        ("study UID", dimse.StudyQuery(study_uid="<uid>")),
        ("accession number", dimse.StudyQuery(accession="<accession>")),
        ("patient id and exam date", dimse.StudyQuery(patient_id="<mrn>", study_date="<YYYYMMDD>")),
    ]
    lines = [
        f"## 4 AE `{dimse.OUR_AE}` as SCU",
        "",
        "Calling AE title `" + dimse.OUR_AE + "`; the called AE title, host, port and TLS settings are the "
        "facility's image source (`PUT /v1/records/sources/{partner_id}`). Every association we request asks "
        f"for PDUs of up to {dimse.MAX_PDU_BYTES} bytes. One association at a time per loop.",
        "",
        *_table(
            ("Association", "Timeout (ACSE, DIMSE, network, connection)", "Attempts"),
            [
                (
                    "Retrieval (C-FIND, C-GET, C-MOVE)",
                    f"{_default(retrieval, 'retrieval_timeout_seconds'):g} s "
                    f"({_env(retrieval, 'retrieval_timeout_seconds')})",
                    f"{_default(retrieval, 'retrieval_attempts')} ({_env(retrieval, 'retrieval_attempts')})",
                ),
                (
                    "Report return (C-STORE, N-ACTION)",
                    f"{_default(returns, 'timeout_seconds'):g} s ({_env(returns, 'timeout_seconds')})",
                    f"{_default(returns, 'attempts')} ({_env(returns, 'attempts')})",
                ),
                (
                    "Storage commitment answer (N-EVENT-REPORT)",
                    f"{_default(commitment, 'timeout_seconds'):g} s ({_env(commitment, 'timeout_seconds')})",
                    f"{_default(commitment, 'attempts')} ({_env(commitment, 'attempts')})",
                ),
            ],
        ),
        "### 4.1 C-FIND SCU",
        "",
        "Study Root Query/Retrieve Information Model - FIND "
        f"(`{qr_scp.QR_FIND}`) at STUDY level, in pynetdicom's default transfer syntaxes:",
        "",
        *_syntaxes(DEFAULT_TRANSFER_SYNTAXES),
        "Matching keys, by what the case's request names (Study Instance UID asked as a return key):",
        "",
        *_table(
            ("The request names", "Matching keys"),
            (
                (what, ", ".join(f"{k}={v}" if v else k for k, v in query.keys().items()))
                for what, query in query_forms
            ),
        ),
        f"Pending statuses ({', '.join(_hex(s) for s in dimse.PENDING)}) carry the matches; any status but "
        "those and Success fails the retrieval (retried).",
        "",
        "### 4.2 C-GET SCU",
        "",
        f"`{qr_scp.QR_GET}` at STUDY level with the Study Instance UID. The association proposes "
        f"{len(get_contexts())} presentation contexts (one per compressed transfer syntax: a PACS accepts one "
        "syntax per context), with SCP/SCU Role Selection proposing the SCP role for each storage class:",
        "",
    ]
    for syntaxes, classes in _get_groups():
        lines += _classes(classes)
        lines += ["Proposed in:", ""]
        lines += _syntaxes(syntaxes)
    lines += [
        "An instance is checked as it arrives and refused with the statuses of 3.6 when unusable (the rest of "
        f"the study is kept). A final status of {_hex(dimse.SOME_FAILED)} or {_hex(dimse.ALL_FAILED)} is "
        "accepted when its failed sub-operations are exactly the instances we refused; any other non-Success "
        "status fails the retrieval, nothing received is kept, and it is retried.",
        "",
        "### 4.3 C-MOVE SCU",
        "",
        f"`{qr_scp.QR_MOVE}` at STUDY level with the Study Instance UID, in pynetdicom's default transfer "
        f"syntaxes, move destination `{dimse.OUR_AE}` (our SCP, 3.6: the PACS must know its host and port). "
        "Final statuses as for C-GET.",
        "",
        "### 4.4 Storage SCU (report return)",
        "",
        f"{_name(encapsulated_pdf.ENCAPSULATED_PDF_STORAGE)} (`{encapsulated_pdf.ENCAPSULATED_PDF_STORAGE}`), "
        f"proposed only in the transfer syntax of the file, {_name(encapsulated_pdf.TRANSFER_SYNTAX)} "
        f"(`{encapsulated_pdf.TRANSFER_SYNTAX}`). Statuses taken as stored: "
        f"{', '.join(_hex(s) for s in sorted(report_return.STORED))}; {report_return.BUSY_PREFIX >> 8:X}xxH "
        "(out of resources) is retried; any other is the PACS refusing the instance, not retried.",
        "",
        "### 4.5 Storage Commitment SCU (Push Model)",
        "",
        f"`{stgcmt.STORAGE_COMMITMENT}` proposed beside the report's context when the image source says "
        "`storage_commitment`: N-ACTION (Request Storage Commitment) on the same association after the "
        f"C-STORE, a new Transaction UID per attempt. The N-EVENT-REPORT is taken on that association (kept "
        f"open {_default(returns, 'commitment_linger_seconds'):g} s, "
        f"{_env(returns, 'commitment_linger_seconds')}) or on our SCP (3.8). No result within "
        f"{_default(returns, 'commitment_timeout_seconds'):g} s ({_env(returns, 'commitment_timeout_seconds')}) "
        "or the instance listed as failed: the report is sent and asked again, counted as an attempt.",
        "",
        "As the committer (3.8), our N-EVENT-REPORT goes on an association we open proposing "
        f"`{stgcmt.STORAGE_COMMITMENT}` with the SCP role (SCP/SCU Role Selection).",
        "",
    ]
    return lines


def _network() -> list[str]:
    retrieval = RetrievalSettings
    return [
        "## 5 Network interfaces and security",
        "",
        "- TCP/IP (PS3.8).",
        "- **DICOM TLS** (PS3.15 Annex B, BCP 195 secure transport connection profiles): TLS "
        f"{dicom_tls.MINIMUM_VERSION.name.removeprefix('TLSv').replace('_', '.')} at least, on any DIMSE link "
        "either way. As SCU: the PACS's certificate verified against the image source's CA bundle and its name "
        "checked (`tls_server_name`, else its host); our client certificate presented when configured (mutual "
        "TLS). As SCP: our certificate; a client certificate required when a client CA is configured.",
        f"- With `ENV=prod`, plain DIMSE to or from a peer off this machine is refused unless "
        f"{_env(retrieval, 'dimse_plain_protected', 'true')} says a VPN protects it; the records process does "
        "not start while its plain SCP listens on a network address.",
        "- **AE and address binding**: a workstation's AE title is bound to its IP address (and to a client "
        "certificate CN on TLS); a storage commitment request is answered only at the host and port configured "
        "for the calling AE title's image source; our SCP keeps instances only of the study a C-MOVE of ours asked "
        "for.",
        "- **Audit**: each Q/R query, each instance sent, and each rejected association or destination is an "
        "audit entry, forwarded to the hospital's audit repository by IHE ATNA (see the integration statement).",
        "",
    ]


def _dicomweb() -> list[str]:
    kinds = {
        "store": "STOW-RS",
        "search": "QIDO-RS",
        "retrieve": "WADO-RS",
        "wado_uri": "WADO-URI",
    }
    rows = []
    for router, prefix in (
        (dicomweb.router, ""),
        (rendered.router, "/dicomweb"),
        (wado_uri.router, "/dicomweb"),
    ):
        for route in router.routes:
            if not isinstance(route, APIRoute):
                continue
            kind = next((k for p, k in kinds.items() if route.name.startswith(p)), route.name)
            rows.append((kind, ", ".join(sorted(route.methods or ())), f"`{prefix}{route.path}`"))
    frame_types = sorted({(t, _name(s)) for s, t in dicomweb.FRAME_TYPES.items()})
    video_types = sorted(set(dicomweb.VIDEO_TYPES.values()))
    return [
        "## 6 DICOMweb (PS3.18)",
        "",
        "The records service's HTTP API; every route needs an API key or a SMART access token (some reads "
        "also take a signed link, see the README) and is scoped to one case (`/dicomweb/cases/{case_id}` is a case's base URL). Responses are what 3.7 "
        "hands out: released instances with our identifiers coerced.",
        "",
        *_table(("Service", "Method", "Path"), sorted(rows, key=lambda r: (r[0], r[2]))),
        "Media types:",
        "",
        f'- STOW-RS takes `multipart/related; type="application/dicom"` (application/dicom parts only); answers '
        f"`{dicomweb.DICOM_JSON}` with the Failed SOP Sequence (Failure Reasons "
        f"{', '.join(_hex(r) for r in stow.FailureReason)}) and Warning Reason {_hex(stow.COERCED)} "
        "(coercion: our identifiers).",
        f"- QIDO-RS and metadata: `{dicomweb.DICOM_JSON}`.",
        '- WADO-RS instances: `multipart/related; type="application/dicom"` (as stored, no transcoding).',
        "- WADO-RS frames, in the stored syntax: "
        + ", ".join(f"`{t}` ({n})" for t, n in frame_types)
        + ", `application/octet-stream` (native); video: "
        + ", ".join(f"`{t}`" for t in video_types)
        + ".",
        f"- Rendered and thumbnail: {', '.join(f'`{t}`' for t in rendering.RENDERED_TYPES)} (the first the "
        f"default); an instance of several frames also as `{video.WEBM}` (VP9, each frame rendered); a video "
        f"clip as `{video.MP4}` (remuxed; the default for H.264 and HEVC) or `{video.WEBM}` (re-encoded as VP9; "
        "the default for MPEG-2).",
        f"- WADO-URI: `{wado_uri.DICOM}`, or rendered as above.",
        "",
    ]


def _media() -> list[str]:
    return [
        "## 7 Media interchange (IHE PDI)",
        "",
        "- **Reading (File-set Reader)**: a CD's content uploaded as a folder or a ZIP. With a DICOMDIR "
        "(found at any folder level, ISO 9660 names matched as a DICOMDIR's file IDs name them) only the "
        "instances it lists are imported; a DICOMDIR that lists a file missing from the upload, or a path "
        "leaving the upload root, refuses the whole upload saying why. The DICOMDIR itself is checked, never "
        "stored. Of the rest of the medium (viewer, autorun, readme) only a PDF (a report) is kept; a DICOMDIR "
        "that lists nothing (a failed burn) leaves the medium's DICOM files imported as found; files uploaded "
        "beside the CD's folder are checked like any upload.",
        "- **Writing (File-set Creator)**: the de-identified export (`GET /v1/records/{case_id}/export/"
        "deidentified`) is a ZIP holding a DICOMDIR at its root and the instances under PS3.10 file IDs, in "
        f"{_name(pydicom.uid.ExplicitVRLittleEndian)}. It is a download, not a PDI medium (no viewer, no "
        "INDEX.HTM).",
        "",
    ]


def _character_sets() -> list[str]:
    terms = sorted(t for t in pydicom.charset.python_encoding if t)
    return [
        "## 8 Character sets",
        "",
        "Instances are stored and handed out in the character set they came in. Headers are decoded (for "
        "matching, QIDO-RS and DICOM JSON) by pydicom, which knows these Specific Character Set terms:",
        "",
        ", ".join(f"`{t}`" for t in terms) + ".",
        "",
        "A C-FIND answer carries the Specific Character Set of the instance it was read from. The report we "
        "write is `ISO_IR 192` (UTF-8), re-encoded to the study's images' character set where all its text "
        "fits, so names match byte for byte.",
        "",
    ]


def _code(code: tuple[str, str, str]) -> str:
    value, scheme, meaning = code
    return f'`({value}, {scheme}, "{meaning}")`'


def _security() -> list[str]:
    return [
        "## 9 De-identification",
        "",
        f"The export of 7: the Basic Application Level Confidentiality Profile, each attribute of PS3.15 Table "
        f"E.1-1 (edition {deidentify.TABLE_EDITION}) handled by its action at every nesting level; De-identification "
        f"Method `{deidentify.METHOD}`. De-identification Method Code Sequence: "
        f"{_code(deidentify.BASIC_PROFILE_CODE)}, and {_code(deidentify.CLEAN_PIXEL_DATA_CODE)} on the "
        "instances whose burned-in text was blanked (every pixel outside the Sequence of Ultrasound Regions). No other option is retained "
        "(no Retain UIDs, Retain Dates, Retain Device Identity, ...): UIDs are replaced (consistently within one "
        "export), private attributes, curves and overlays removed. Instances whose text cannot be cleaned "
        "(documents, video, undecodable pixel data) are withheld and counted in `DEIDENTIFICATION.json`.",
        "",
    ]


def _identification() -> list[str]:
    ae = scp_ae()
    return [
        "## 10 Implementation identification",
        "",
        "Our own, not the toolkit's: a UUID-derived UID (PS3.5 B.2), in every association we request or accept",
        "and in the file meta information of the instances we write: the report, the de-identified export's",
        "images, and every copy of an instance handed out as a file (WADO-RS, WADO-URI, downloads), whose",
        "header carries our identifiers; such a copy's Source Application Entity Title is ours too, and the",
        "Sending and Receiving AE Titles and Presentation Addresses of the transfer the original came by are",
        "left out (the export's DICOMDIR, written by pydicom's File-set writer, names pydicom's).",
        "",
        *_table(
            ("", "Value"),
            [
                ("Implementation Class UID", f"`{ae.implementation_class_uid}`"),
                ("Implementation Version Name", f"`{ae.implementation_version_name}`"),
            ],
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="exit 1 if the checked-in statement is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not STATEMENT.exists() or STATEMENT.read_text() != text:
            print(f"{STATEMENT} is stale: run `{COMMAND}` and commit it", file=sys.stderr)
            return 1
        return 0
    STATEMENT.write_text(text)
    print(f"wrote {STATEMENT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
