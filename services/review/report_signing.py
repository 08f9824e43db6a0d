"""The report PDF as a PAdES digital signature (ETSI EN 319 142-1) by the platform's document-signing identity.

Every PDF the service issues, the first report and each addendum's re-issue, is signed here before it is stored,
so the download, the DiagnosticReport's presentedForm and the DICOM Encapsulated PDF carry the same signed
bytes: any change to them breaks the signature. The signature is PAdES baseline B-B (`/ETSI.CAdES.detached`),
B-T when REVIEW_REPORT_TSA_URL names an RFC 3161 timestamp authority. Its /Name and /Reason say who signed the
report and why (the reviewer's name and credentials, never the patient's), /Location the programme, /M the
time the reviewer signed.

    ReportSigningUnavailable   (the identity cannot be loaded or used: nothing is issued unsigned; the
                                command is retried, a specialist's addendum answered 503)
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path

import aiohttp
import structlog
from asn1crypto import keys as asn1_keys
from asn1crypto import x509 as asn1_x509
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.utils import CryptographyDeprecationWarning
from cryptography.x509.oid import NameOID

with warnings.catch_warnings():  # pyHanko imports DSA types on import; we never sign with DSA
    warnings.filterwarnings("ignore", "DSA is deprecated", CryptographyDeprecationWarning)
    from pyhanko.pdf_utils.incremental_writer import IncrementalPdfFileWriter
    from pyhanko.sign import fields, signers
    from pyhanko.sign.signers.pdf_cms import PdfCMSSignedAttributes
    from pyhanko.sign.timestamps import HTTPTimeStamper
    from pyhanko_certvalidator.registry import SimpleCertificateStore

from services.common.config import Settings

log = structlog.get_logger(__name__)

FIELD_NAME = "ReportSignature"
REPORT_ISSUED = "Second-opinion report issued"
ADDENDUM_ISSUED = "Addendum issued"
DEV_IDENTITY = "signing/dev-identity.pem"  # under the review data directory: key, certificate, its CA
TSA_TIMEOUT_SECONDS = 10


class ReportSigningUnavailable(Exception):
    """The document-signing identity cannot be loaded or used; no report is issued unsigned."""


@dataclass(frozen=True)
class SigningIdentity:
    signer: signers.SimpleSigner
    subject: str  # the certificate's subject, for logs and errors
    not_before: datetime
    not_after: datetime

    def validity_problem(self, at: datetime) -> str | None:
        """Why a signature made at `at` would not be valid (the certificate is not valid then), or None."""
        if at < self.not_before:
            return f"the document-signing certificate {self.subject} is valid from {self.not_before.isoformat()} only"
        if at >= self.not_after:
            return (
                f"the document-signing certificate {self.subject} expired at {self.not_after.isoformat()}; "
                "install its renewal (REVIEW_REPORT_SIGNING_KEY_FILE / _CERT_FILE)"
            )
        return None


@dataclass(frozen=True)
class ReportSigner:
    """Who signs on the report and why, without any patient data."""

    name: str  # the reviewer's name and credentials
    reason: str  # REPORT_ISSUED or ADDENDUM_ISSUED
    signed_at: datetime  # when the reviewer signed this version


def sign_report_pdf(pdf: bytes, who: ReportSigner, settings: Settings) -> bytes:
    """The PDF with a PAdES signature added as an incremental update (the page content is left as it is).

    The signed file has an even length, so the DICOM Encapsulated PDF carries it without a pad byte: the bytes
    a PACS hands out are the signed bytes, ByteRange covering the whole file. Runs its own event loop (the TSA
    is asked over aiohttp): call it from a thread, as the consumer and the sync routes do."""
    identity = signing_identity(settings)
    if problem := identity.validity_problem(datetime.now(UTC)):
        log.error("report.signing_certificate_not_valid", subject=identity.subject)
        raise ReportSigningUnavailable(f"{problem}; nothing was issued")
    meta = signers.PdfSignatureMetadata(
        field_name=FIELD_NAME,
        md_algorithm="sha256",
        subfilter=fields.SigSeedSubFilter.PADES,
        name=who.name,
        reason=who.reason,
        location=settings.review_report_signing_location,
    )
    tsa_url = settings.review_report_tsa_url
    try:
        signed = asyncio.run(_sign(pdf, meta, identity, tsa_url, who.signed_at))
    except Exception as exc:
        log.error(
            "report.signing_failed", subject=identity.subject, error=type(exc).__name__, tsa=bool(tsa_url)
        )
        raise ReportSigningUnavailable(
            f"the report PDF could not be signed with the document-signing certificate {identity.subject} "
            f"({type(exc).__name__}{', asking the timestamp authority REVIEW_REPORT_TSA_URL' if tsa_url else ''}); "
            "nothing was issued unsigned"
        ) from exc
    return signed


async def _sign(
    pdf: bytes,
    meta: signers.PdfSignatureMetadata,
    identity: SigningIdentity,
    tsa_url: str | None,
    signed_at: datetime,
) -> bytes:
    reserved = _reserved(identity, timestamped=bool(tsa_url))
    async with contextlib.AsyncExitStack() as stack:
        timestamper = None
        if tsa_url:  # a session of this event loop, closed with it
            session = await stack.enter_async_context(aiohttp.ClientSession())
            timestamper = HTTPTimeStamper(tsa_url, timeout=TSA_TIMEOUT_SECONDS, session=session)
        pdf_signer = _SignedAt(meta, signer=identity.signer, timestamper=timestamper, signed_at=signed_at)
        # The update is written with the signature's room reserved before anything is signed, so its length is
        # known then: PDF whitespace after %%EOF moves it by a byte (two where `startxref` gains a digit), so of
        # three layouts in a row one is even. Only that one is signed: building the signature is most of the work.
        for padding in (b"", b"\n", b"\n\n"):
            writer = IncrementalPdfFileWriter(io.BytesIO(pdf + padding), strict=False)
            output = io.BytesIO()
            digest, document, _ = await pdf_signer.async_digest_doc_for_signing(
                writer, bytes_reserved=reserved, output=output
            )
            if len(output.getbuffer()) % 2 == 0:
                break
        else:  # pragma: no cover - cannot happen (above)
            raise RuntimeError("no even-length layout of the signed update")
        signed = await document.perform_signature(
            document_digest=digest.document_digest,
            pdf_cms_signed_attrs=PdfCMSSignedAttributes(
                signing_time=pdf_signer.signed_at, cades_signed_attrs=meta.cades_signed_attr_spec
            ),
        )
        await signed.post_signature_processing(output)
    return bytes(output.getbuffer())


def _reserved(identity: SigningIdentity, *, timestamped: bool) -> int:
    """Room to reserve for the signature (CMS): its certificates, the signature and signed attributes, and a
    timestamp token where one is asked for. Given, pyHanko does not build a whole trial signature to measure it
    (that trial was about 40 % of the signing CPU)."""
    certificates = [identity.signer.signing_cert, *identity.signer.cert_registry]
    size = sum(len(certificate.dump()) for certificate in certificates) + 4096
    return 2 * (size + (16384 if timestamped else 0))  # hexadecimal digits in /Contents: two a byte


class _SignedAt(signers.PdfSigner):
    """A PdfSigner whose claimed signing time (/M) is the reviewer's, not the clock's when the PDF is made."""

    def __init__(
        self,
        meta: signers.PdfSignatureMetadata,
        *,
        signer: signers.Signer,
        timestamper: HTTPTimeStamper | None,
        signed_at: datetime,
    ) -> None:
        super().__init__(meta, signer=signer, timestamper=timestamper)
        self.signed_at = signed_at.astimezone(UTC)

    def init_signing_session(self, pdf_out, existing_fields_only=False):  # type: ignore[no-untyped-def]
        session = super().init_signing_session(pdf_out, existing_fields_only=existing_fields_only)
        session.system_time = self.signed_at
        return session


def signing_identity(settings: Settings) -> SigningIdentity:
    """The configured identity, or in development one made once. Loaded again when a file changes, so a
    renewed certificate (a Secret updated in place) signs from the next report on, without a restart."""
    passphrase = settings.review_report_signing_passphrase
    files = (
        settings.review_report_signing_key_file,
        settings.review_report_signing_cert_file,
        settings.review_report_signing_chain_file,
    )
    return _identity(
        *files,
        passphrase.get_secret_value().encode() if passphrase else None,
        settings.service_dir("review") / DEV_IDENTITY if settings.env != "prod" else None,
        changed=tuple(_modified(path) for path in files),
    )


def _modified(path: Path | None) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten or, as Kubernetes updates a Secret, swapped for another."""
    try:
        stat = path.stat() if path is not None else None
    except OSError:
        return None  # unreadable: loading says why
    return (stat.st_ino, stat.st_size, stat.st_mtime_ns) if stat is not None else None


def signing_problems(settings: Settings) -> list[str]:
    """What keeps the service from signing reports (empty when it can): asked at start with ENV=prod."""
    if settings.review_report_signing_key_file is None:
        return [
            "REVIEW_REPORT_SIGNING_KEY_FILE (with REVIEW_REPORT_SIGNING_CERT_FILE and _CHAIN_FILE, or a PKCS#12 "
            "file) must name the platform's document-signing key: every report PDF is signed with it"
        ]
    try:
        identity = signing_identity(settings)
    except ReportSigningUnavailable as exc:
        return [str(exc)]
    if problem := identity.validity_problem(datetime.now(UTC)):
        return [problem]
    return []


@lru_cache(maxsize=8)
def _identity(
    key_file: Path | None,
    cert_file: Path | None,
    chain_file: Path | None,
    passphrase: bytes | None,
    dev_identity: Path | None,
    *,
    changed: tuple[tuple[int, int, int] | None, ...],  # what _modified says of each file: the cache key only
) -> SigningIdentity:
    if key_file is None:
        if dev_identity is None:
            raise ReportSigningUnavailable(
                "no document-signing key is configured (REVIEW_REPORT_SIGNING_KEY_FILE); with ENV=prod the "
                "report is never signed with a development key, and never issued unsigned"
            )
        key, cert, chain = _load_pem(_dev_identity(dev_identity), None, None, None)
    elif key_file.suffix.lower() in (".p12", ".pfx"):
        key, cert, chain = _load_pkcs12(key_file, passphrase)
    else:
        if cert_file is None:
            raise ReportSigningUnavailable(
                "REVIEW_REPORT_SIGNING_KEY_FILE is a PEM/DER key: REVIEW_REPORT_SIGNING_CERT_FILE must name its "
                "certificate (or give a PKCS#12 .p12/.pfx file holding both)"
            )
        key, cert, chain = _load_pem(key_file, cert_file, chain_file, passphrase)
    if key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) != cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ):
        raise ReportSigningUnavailable(
            f"the document-signing key is not the key of the certificate {cert.subject.rfc4514_string()} "
            "(REVIEW_REPORT_SIGNING_KEY_FILE and _CERT_FILE do not belong together); every signature would be invalid"
        )
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not (usage.digital_signature or usage.content_commitment):
        raise ReportSigningUnavailable(
            f"the certificate {cert.subject.rfc4514_string()} may not sign documents (its key usage has neither "
            "digitalSignature nor nonRepudiation); REVIEW_REPORT_SIGNING_CERT_FILE must be a document-signing one"
        )
    signing_cert = asn1_x509.Certificate.load(cert.public_bytes(serialization.Encoding.DER))
    signer = signers.SimpleSigner(
        signing_cert=signing_cert,
        signing_key=asn1_keys.PrivateKeyInfo.load(
            key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        ),
        cert_registry=SimpleCertificateStore.from_certs(
            [asn1_x509.Certificate.load(c.public_bytes(serialization.Encoding.DER)) for c in chain]
        ),
    )
    return SigningIdentity(
        signer, cert.subject.rfc4514_string(), cert.not_valid_before_utc, cert.not_valid_after_utc
    )


def _load_pem(
    key_file: Path, cert_file: Path | None, chain_file: Path | None, passphrase: bytes | None
) -> tuple[PrivateKeyTypes, x509.Certificate, list[x509.Certificate]]:
    """A PEM or DER key, its certificate (the key file's own when it holds both) and the chain."""
    key_data = _read(key_file, "REVIEW_REPORT_SIGNING_KEY_FILE")
    try:
        if key_data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(key_data, passphrase)
        else:
            key = serialization.load_der_private_key(key_data, passphrase)
    except (ValueError, TypeError) as exc:
        raise ReportSigningUnavailable(
            f"REVIEW_REPORT_SIGNING_KEY_FILE {key_file} is not a private key that opens "
            f"({'with' if passphrase else 'without'} REVIEW_REPORT_SIGNING_PASSPHRASE): {exc}"
        ) from None
    certs = _certificates(cert_file or key_file, "REVIEW_REPORT_SIGNING_CERT_FILE")
    if not certs:
        raise ReportSigningUnavailable(f"REVIEW_REPORT_SIGNING_CERT_FILE {cert_file} holds no certificate")
    chain = certs[1:] + (_certificates(chain_file, "REVIEW_REPORT_SIGNING_CHAIN_FILE") if chain_file else [])
    return key, certs[0], chain


def _load_pkcs12(
    path: Path, passphrase: bytes | None
) -> tuple[PrivateKeyTypes, x509.Certificate, list[x509.Certificate]]:
    try:
        key, cert, chain = pkcs12.load_key_and_certificates(
            _read(path, "REVIEW_REPORT_SIGNING_KEY_FILE"), passphrase
        )
    except ValueError as exc:
        raise ReportSigningUnavailable(
            f"REVIEW_REPORT_SIGNING_KEY_FILE {path} is not a PKCS#12 file that opens with "
            f"REVIEW_REPORT_SIGNING_PASSPHRASE ({exc})"
        ) from None
    if key is None or cert is None:
        raise ReportSigningUnavailable(
            f"the PKCS#12 file {path} must hold the document-signing key and its certificate"
        )
    return key, cert, list(chain)


def _certificates(path: Path, setting: str) -> list[x509.Certificate]:
    data = _read(path, setting)
    if not data.strip():
        return []  # a chain file left empty: the certificate is issued by the root itself
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            return x509.load_pem_x509_certificates(data)
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ReportSigningUnavailable(
            f"{setting} {path} is not a certificate file (PEM or DER): {exc}"
        ) from None


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReportSigningUnavailable(f"{setting} {path} cannot be read ({exc.strerror})") from None


def _dev_identity(path: Path) -> Path:
    """A development CA and a document-signing certificate it issued, made once (every process reads the same
    one: written to a temporary file, then linked into place only if no other process got there first)."""
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "secondopinion development document CA")])
    ca = (
        _certificate(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "secondopinion report signing (development)"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "secondopinion development"),
        ]
    )
    cert = (
        _certificate(name, ca_name, key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    bundle = b"".join(
        [
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            cert.public_bytes(serialization.Encoding.PEM),
            ca.public_bytes(serialization.Encoding.PEM),
        ]
    )
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".tmp", delete=False) as tmp:
        tmp.write(bundle)
    try:
        os.link(tmp.name, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp.name)
    log.warning("report.development_signing_identity_made", path=str(path))
    return path


def _certificate(
    subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey, now: datetime
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=3650))
    )


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=not ca,  # non-repudiation: what a document signature is checked for
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
