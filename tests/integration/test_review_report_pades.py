"""Every report PDF the review service issues is a PAdES signature by the platform's document-signing identity:
pyHanko's validator (the test CA as the only trust root) and poppler's pdfsig find it intact, valid and trusted
in the PDF downloaded, the PDF the DiagnosticReport's presentedForm points at (its size and hash those of the
signed bytes) and the PDF inside the DICOM Encapsulated PDF records places into the study; any changed byte
breaks it; an addendum's re-issue is signed too; with a timestamp authority (OpenSSL's, on a loopback port)
it is B-T; the signature names the reviewer, never the patient; and a
signing identity that cannot sign issues nothing, unsigned or otherwise."""

from __future__ import annotations

import base64
import hashlib
import io
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509 import load_pem_x509_certificate
from fastapi.testclient import TestClient
from pyhanko.keys import load_cert_from_pemder
from pyhanko.pdf_utils.reader import PdfFileReader
from pyhanko.sign.validation import validate_pdf_signature
from pyhanko.sign.validation.status import PdfSignatureStatus, SignatureCoverageLevel
from pyhanko_certvalidator import ValidationContext
from reportlab.pdfgen.canvas import Canvas
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from services.common.config import Settings
from services.common.db import Outbox
from services.review import report_signing
from services.review.models import Report, Review
from services.review.report_signing import ReportSigningUnavailable
from tests.infra import free_port
from tests.integration import test_review_flow as flow
from tests.integration.test_records_second_opinion import store_images
from tests.integration.test_report_dicom_download import (
    compose,
    deliver_report,
    from_review,
    records_engine,
    records_url,
    review_client,
    reviewed_case,
)
from tests.keys import specialist_headers
from tests.pki import Authority, Issued
from tests.tsa import openssl_tsa

__all__ = ["records_engine", "records_url"]  # the fixtures, as the DICOM download's tests have them

engine, empty_tables = flow.engine, flow.empty_tables

PDF = {"Accept": "application/pdf"}


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return Authority(tmp_path_factory.mktemp("pades"), "documents")


@pytest.fixture(scope="module")
def signer_cert(authority: Authority) -> Issued:
    return authority.issue_document_signer("secondopinion report signing")


@pytest.fixture(scope="module")
def signing(settings: Settings, authority: Authority, signer_cert: Issued) -> Settings:
    """The service's settings with the test CA's document-signing certificate as its identity."""
    return settings.model_copy(
        update={
            "review_report_signing_key_file": signer_cert.key,
            "review_report_signing_cert_file": signer_cert.cert,
            "review_report_signing_chain_file": authority.cert,
            "review_report_signing_location": "Second-opinion programme (test)",
        }
    )


@pytest.fixture
def review(engine: Engine, signing: Settings, records_url: str) -> Iterator[TestClient]:
    with review_client(engine, signing, records_url) as client:
        yield client


def validated(pdf: bytes, authority: Authority) -> PdfSignatureStatus:
    """pyHanko's verdict on the one signature of `pdf`, the test CA the only trust root."""
    reader = PdfFileReader(io.BytesIO(pdf))
    [signature] = reader.embedded_signatures
    context = ValidationContext(
        trust_roots=[load_cert_from_pemder(str(authority.cert))], allow_fetching=False
    )
    return validate_pdf_signature(signature, context)


def assert_signed(pdf: bytes, authority: Authority) -> PdfSignatureStatus:
    status = validated(pdf, authority)
    assert (status.intact, status.valid, status.trusted) == (True, True, True), status.pretty_print_details()
    assert status.coverage == SignatureCoverageLevel.ENTIRE_FILE  # nothing after it, not even a pad byte
    assert status.bottom_line
    return status


def pdfsig(pdf: bytes, tmp_path: Path) -> str:
    """poppler's report (-nocert: its NSS database does not hold the test CA; pyHanko checks the trust)."""
    path = tmp_path / f"report-{hashlib.sha256(pdf).hexdigest()[:8]}.pdf"
    path.write_bytes(pdf)
    return subprocess.run(
        ["pdfsig", "-nocert", str(path)], capture_output=True, text=True, timeout=30, check=False
    ).stdout


def signature_dictionary(pdf: bytes) -> dict[str, str]:
    [signature] = PdfFileReader(io.BytesIO(pdf)).embedded_signatures
    return {
        str(key): str(value)
        for key, value in signature.sig_object.items()
        if key not in ("/Contents", "/ByteRange")
    }


def submitted_at(engine: Engine, review_id: str) -> str:
    with Session(engine) as session:
        review = session.get(Review, review_id)
        assert review is not None and review.submitted_at is not None
        return review.submitted_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def test_the_report_downloaded_fhir_and_dicom_carry_the_same_valid_pades_signature(
    engine: Engine,
    records_engine: Engine,
    signing: Settings,
    review: TestClient,
    authority: Authority,
    tmp_path: Path,
) -> None:
    case_id, study, review_id = reviewed_case(engine, records_engine, signing, review)
    store_images(records_engine, signing, case_id, study, birth_date="19800101")
    compose(engine, signing, case_id, review_id)
    deliver_report(engine, records_engine, signing, case_id)

    downloaded = review.get(f"/v1/reports/{case_id}", headers=PDF)
    diagnostic_report = review.get(f"/v1/reports/{case_id}").json()
    [form] = diagnostic_report["presentedForm"]
    presented = review.get(form["url"].removeprefix(signing.review_url))
    dicom = pydicom.dcmread(io.BytesIO(from_review(review, case_id).content))

    pdf = downloaded.content
    status = assert_signed(pdf, authority)
    assert presented.content == pdf
    assert form["size"] == len(pdf)
    assert form["hash"] == base64.b64encode(hashlib.sha1(pdf, usedforsecurity=False).digest()).decode()
    # The PDF in the DICOM the PACS gets back is the signed file itself: no pad byte, the whole of it signed.
    encapsulated = bytes(dicom.EncapsulatedDocument)
    assert encapsulated == pdf and dicom.EncapsulatedDocumentLength == len(pdf)
    assert_signed(encapsulated, authority)
    # PAdES baseline B-B (ETSI EN 319 142-1 6.3): CAdES detached, the signing certificate bound by ESS
    # signing-certificate-v2, no CMS signing-time (the claimed time is the dictionary's /M).
    sig = signature_dictionary(pdf)
    assert sig["/SubFilter"] == "/ETSI.CAdES.detached"
    [embedded] = PdfFileReader(io.BytesIO(pdf)).embedded_signatures
    attributes = {a["type"].native for a in embedded.signer_info["signed_attrs"]}
    assert "signing_certificate_v2" in attributes and "signing_time" not in attributes
    assert status.signer_reported_dt is not None
    assert status.signer_reported_dt.strftime("%Y-%m-%d %H:%M:%S") == submitted_at(engine, review_id)
    poppler = pdfsig(pdf, tmp_path)
    assert "Signature Validation: Signature is Valid." in poppler and "Total document signed" in poppler, (
        poppler
    )
    assert "Signature Type: ETSI.CAdES.detached" in poppler
    # The page still reads as the report (the signature is an incremental update beside it).
    assert "Electronically signed" in flow.pdf_text(pdf)


def test_the_signature_names_the_reviewer_and_why_never_the_patient(
    engine: Engine, records_engine: Engine, signing: Settings, review: TestClient, authority: Authority
) -> None:
    case_id, _, review_id = reviewed_case(engine, records_engine, signing, review)
    compose(engine, signing, case_id, review_id)
    pdf = review.get(f"/v1/reports/{case_id}", headers=PDF).content
    with Session(engine) as session:
        signed = session.exec(select(Review).where(Review.id == review_id)).one()
        request = signed.request

    sig = signature_dictionary(pdf)

    assert sig["/Reason"] == "Second-opinion report issued"
    assert sig["/Location"] == "Second-opinion programme (test)"
    assert sig["/Name"] == f"{signed.signed_name}, {signed.signed_credentials}"  # the reviewer who signed
    signed_update = pdf[pdf.index(b"%%EOF") :]  # what signing added after the report as rendered
    patient = request["patient"]
    for phi in (patient["mrn"], patient["family_name"], patient["given_name"], patient["birth_date"]):
        assert all(phi not in value for value in sig.values()), phi
        assert phi.encode() not in signed_update, phi


def test_a_changed_byte_breaks_the_signature(
    engine: Engine,
    records_engine: Engine,
    signing: Settings,
    review: TestClient,
    authority: Authority,
    tmp_path: Path,
) -> None:
    case_id, _, review_id = reviewed_case(engine, records_engine, signing, review)
    compose(engine, signing, case_id, review_id)
    pdf = review.get(f"/v1/reports/{case_id}", headers=PDF).content
    # One digit of the first page's size, in the report as rendered: the file still parses.
    at = pdf.index(b"/MediaBox [ 0 0 595.2756") + len(b"/MediaBox [ 0 0 595.275")
    tampered = pdf[:at] + b"7" + pdf[at + 1 :]

    status = validated(tampered, authority)

    assert not status.intact and not status.bottom_line  # the digest of the signed bytes no longer matches
    assert "Signature is Invalid" in pdfsig(tampered, tmp_path) or "Digest Mismatch" in pdfsig(
        tampered, tmp_path
    )


def test_an_addendum_reissues_a_report_signed_on_its_own(
    engine: Engine, records_engine: Engine, signing: Settings, review: TestClient, authority: Authority
) -> None:
    case_id, _, review_id = reviewed_case(engine, records_engine, signing, review)
    compose(engine, signing, case_id, review_id)
    first = review.get(f"/v1/reports/{case_id}", headers=PDF).content
    added = review.post(
        f"/v1/reviews/{review_id}/addenda",
        json={"kind": "correction", "text": "The lesion is in the LEFT ovary."},
        headers=specialist_headers(signing),
    )
    assert added.status_code == 201, added.text

    second = review.get(f"/v1/reports/{case_id}", headers=PDF).content
    diagnostic_report = review.get(f"/v1/reports/{case_id}").json()

    assert second != first
    status = assert_signed(second, authority)
    assert signature_dictionary(second)["/Reason"] == "Addendum issued"
    assert status.signer_reported_dt is not None
    assert status.signer_reported_dt.strftime("%Y-%m-%d %H:%M:%S") == added.json()["signed_at"][:19].replace(
        "T", " "
    )
    assert "The lesion is in the LEFT ovary." in flow.pdf_text(second)
    assert diagnostic_report["presentedForm"][0]["size"] == len(second)
    assert_signed(first, authority)  # the first version, as it was delivered, stays valid


def test_a_key_that_cannot_sign_issues_nothing_and_the_compose_is_retried(
    engine: Engine,
    records_engine: Engine,
    signing: Settings,
    review: TestClient,
    authority: Authority,
    tmp_path: Path,
) -> None:
    case_id, _, review_id = reviewed_case(engine, records_engine, signing, review)
    other = authority.issue_document_signer("another signer")
    mismatched = signing.model_copy(update={"review_report_signing_key_file": other.key})

    with pytest.raises(ReportSigningUnavailable, match="do not belong together"):
        compose(engine, mismatched, case_id, review_id)

    with Session(engine) as session:
        assert session.exec(select(Report).where(Report.case_id == case_id)).first() is None
        announced = session.exec(
            select(Outbox.routing_key).where(Outbox.message_id.like(f"%{case_id}%"))
        ).all()  # type: ignore[attr-defined]
        assert "report.ready" not in announced and "document.encapsulated_report" not in announced
    # Not poison: redelivered (as the consumer does with any failure) once the identity is fixed, it issues.
    compose(engine, signing, case_id, review_id)
    assert_signed(review.get(f"/v1/reports/{case_id}", headers=PDF).content, authority)


def test_an_addendum_that_cannot_be_signed_is_refused_503_and_not_recorded(
    engine: Engine, records_engine: Engine, signing: Settings, records_url: str, authority: Authority
) -> None:
    with review_client(engine, signing, records_url) as review:
        case_id, _, review_id = reviewed_case(engine, records_engine, signing, review)
        compose(engine, signing, case_id, review_id)
    broken = signing.model_copy(
        update={"review_report_signing_cert_file": authority.cert}
    )  # the CA's, not ours
    with review_client(engine, broken, records_url) as review:
        refused = review.post(
            f"/v1/reviews/{review_id}/addenda",
            json={"kind": "correction", "text": "The lesion is in the LEFT ovary."},
            headers=specialist_headers(signing),
        )
        diagnostic_report = review.get(f"/v1/reports/{case_id}").json()

    assert refused.status_code == 503 and refused.headers["Retry-After"]
    assert "not recorded" in refused.json()["detail"] and "REVIEW_REPORT_SIGNING" in refused.json()["detail"]
    assert diagnostic_report["meta"]["versionId"] == "1"


def test_a_pkcs12_identity_opens_with_its_passphrase_and_says_so_without_it(
    signing: Settings, signer_cert: Issued, authority: Authority, tmp_path: Path
) -> None:
    key = serialization.load_pem_private_key(signer_cert.key.read_bytes(), None)
    bundle = tmp_path / "signer.p12"
    bundle.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"signer",
            key,  # type: ignore[arg-type]
            load_pem_x509_certificate(signer_cert.cert.read_bytes()),
            [load_pem_x509_certificate(authority.cert.read_bytes())],
            serialization.BestAvailableEncryption(b"s3cret"),
        )
    )
    pkcs = signing.model_copy(
        update={
            "review_report_signing_key_file": bundle,
            "review_report_signing_cert_file": None,
            "review_report_signing_chain_file": None,
            "review_report_signing_passphrase": "s3cret",
            "env": "prod",
        }
    )
    pkcs = Settings.model_validate(pkcs.model_dump())  # the passphrase as a setting is read (a SecretStr)
    wrong = Settings.model_validate({**pkcs.model_dump(), "review_report_signing_passphrase": "guess"})

    assert report_signing.signing_problems(pkcs) == []
    [problem] = report_signing.signing_problems(wrong)
    assert "is not a PKCS#12 file that opens with REVIEW_REPORT_SIGNING_PASSPHRASE" in problem
    signed = report_signing.sign_report_pdf(
        small_pdf(),
        report_signing.ReportSigner("Dr. A, MD", report_signing.REPORT_ISSUED, datetime.now(UTC)),
        pkcs,
    )
    assert_signed(signed, authority)


def test_production_without_a_signing_identity_is_named() -> None:
    [problem] = report_signing.signing_problems(Settings(env="prod"))
    assert "REVIEW_REPORT_SIGNING_KEY_FILE" in problem


def test_a_certificate_not_for_signing_documents_is_named_at_start(
    signing: Settings, authority: Authority
) -> None:
    tls_only = authority.issue_document_signer("key encipherment only", key_usage=False)
    settings = signing.model_copy(
        update={
            "review_report_signing_key_file": tls_only.key,
            "review_report_signing_cert_file": tls_only.cert,
        }
    )

    [problem] = report_signing.signing_problems(settings)

    assert "may not sign documents" in problem and "REVIEW_REPORT_SIGNING_CERT_FILE" in problem


def test_the_signed_file_has_an_even_length_whatever_the_rendered_one(
    signing: Settings, authority: Authority
) -> None:
    """So the DICOM Encapsulated PDF needs no pad byte: with one after %%EOF the signature covers a revision,
    not the whole file, and poppler says "Not total document signed"."""
    who = report_signing.ReportSigner("Dr. A, MD", report_signing.REPORT_ISSUED, datetime.now(UTC))
    rendered = small_pdf()
    for pdf in (rendered, rendered + b"\n"):  # one of them signs to an odd length without more
        signed = report_signing.sign_report_pdf(pdf, who, signing)
        assert len(signed) % 2 == 0
        assert_signed(signed, authority)


def small_pdf() -> bytes:
    buffer = io.BytesIO()
    canvas = Canvas(buffer, invariant=1)
    canvas.drawString(100, 100, "report")
    canvas.save()
    return buffer.getvalue()


def test_with_a_timestamp_authority_the_signature_is_pades_b_t(
    engine: Engine,
    records_engine: Engine,
    signing: Settings,
    records_url: str,
    authority: Authority,
    tmp_path: Path,
) -> None:
    with openssl_tsa(authority, tmp_path) as tsa_url:
        stamped = signing.model_copy(update={"review_report_tsa_url": tsa_url})
        with review_client(engine, stamped, records_url) as review:
            case_id, _, review_id = reviewed_case(engine, records_engine, stamped, review)
            compose(engine, stamped, case_id, review_id)
            pdf = review.get(f"/v1/reports/{case_id}", headers=PDF).content

    [embedded] = PdfFileReader(io.BytesIO(pdf)).embedded_signatures
    context = ValidationContext(
        trust_roots=[load_cert_from_pemder(str(authority.cert))], allow_fetching=False
    )
    status = validate_pdf_signature(embedded, context, ts_validation_context=context)

    assert (status.intact, status.valid, status.trusted) == (True, True, True), status.pretty_print_details()
    assert status.timestamp_validity is not None  # the signature-time-stamp of B-T, by our TSA
    stamp = status.timestamp_validity
    assert (stamp.intact, stamp.valid, stamp.trusted) == (True, True, True)
    assert status.signer_reported_dt is not None and stamp.timestamp >= status.signer_reported_dt
    assert "signature_time_stamp_token" in {a["type"].native for a in embedded.signer_info["unsigned_attrs"]}
    assert len(pdf) % 2 == 0
    assert "Signature Validation: Signature is Valid." in pdfsig(pdf, tmp_path)


def test_a_timestamp_authority_that_does_not_answer_issues_nothing(signing: Settings) -> None:
    unanswered = signing.model_copy(update={"review_report_tsa_url": f"http://127.0.0.1:{free_port()}/"})
    who = report_signing.ReportSigner("Dr. A, MD", report_signing.REPORT_ISSUED, datetime.now(UTC))

    with pytest.raises(ReportSigningUnavailable, match="REVIEW_REPORT_TSA_URL"):
        report_signing.sign_report_pdf(small_pdf(), who, unanswered)


def test_a_certificate_renewed_in_place_signs_the_next_report(
    signing: Settings, authority: Authority, signer_cert: Issued, tmp_path: Path
) -> None:
    key, cert = tmp_path / "tls.key", tmp_path / "tls.crt"
    key.write_bytes(signer_cert.key.read_bytes())
    cert.write_bytes(signer_cert.cert.read_bytes())
    mounted = signing.model_copy(
        update={"review_report_signing_key_file": key, "review_report_signing_cert_file": cert}
    )
    who = report_signing.ReportSigner("Dr. A, MD", report_signing.REPORT_ISSUED, datetime.now(UTC))
    before = report_signing.sign_report_pdf(small_pdf(), who, mounted)

    renewed = authority.issue_document_signer("secondopinion report signing 2027")
    key.write_bytes(renewed.key.read_bytes())
    cert.write_bytes(renewed.cert.read_bytes())
    after = report_signing.sign_report_pdf(small_pdf(), who, mounted)

    def signer(pdf: bytes) -> str:
        return str(assert_signed(pdf, authority).signing_cert.subject.native["common_name"])

    assert (signer(before), signer(after)) == (
        "secondopinion report signing",
        "secondopinion report signing 2027",
    )
