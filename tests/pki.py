"""A throwaway PKI for TLS tests: a CA, and certificates it signs, written as PEM files."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path


class Authority:
    """A certificate authority whose certificate is `self.cert` (PEM)."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = folder
        self.name = name
        self._key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._certificate = (
            self._builder(subject, subject, self._key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.cert = folder / f"{name}-ca.pem"
        self.cert.write_bytes(self._certificate.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        common_name: str,
        *,
        server: bool = False,
        also_client: bool = False,
        dns_names: tuple[str, ...] = (),
    ) -> Issued:
        """A certificate for a TLS server on 127.0.0.1 (`server`, and named `dns_names` too) or a TLS client
        named `common_name`; `also_client`: a server's that it also presents as a client (a PACS sending
        C-STOREs with it)."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if also_client or not server:
            usage.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                self._certificate.subject,
                key.public_key(),
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), *map(x509.DNSName, dns_names)]
                ),
                critical=False,
            )
        certificate = builder.sign(self._key, hashes.SHA256())
        issued = Issued(
            self.folder / f"{self.name}-{common_name}.pem", self.folder / f"{self.name}-{common_name}.key"
        )
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return issued

    def issue_document_signer(self, common_name: str, *, key_usage: bool = True) -> Issued:
        """A document-signing certificate (digitalSignature and nonRepudiation, as a PDF signer's is checked
        for); `key_usage` False: one whose key usage says it may only encipher keys."""
        key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(
            digital_signature=key_usage,
            content_commitment=key_usage,
            key_encipherment=not key_usage,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        certificate = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                self._certificate.subject,
                key.public_key(),
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(usage, critical=True)
            .sign(self._key, hashes.SHA256())
        )
        return self._write(common_name, certificate, key)

    def issue_timestamping(self, common_name: str) -> Issued:
        """A timestamp authority's certificate (RFC 3161 2.3: the critical extended key usage timeStamping)."""
        key = ec.generate_private_key(ec.SECP256R1())
        certificate = (
            self._builder(
                x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]),
                self._certificate.subject,
                key.public_key(),
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.TIME_STAMPING]), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        return self._write(common_name, certificate, key)

    def _write(
        self, common_name: str, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey
    ) -> Issued:
        issued = Issued(
            self.folder / f"{self.name}-{common_name}.pem", self.folder / f"{self.name}-{common_name}.key"
        )
        issued.cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        issued.key.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        return issued

    @staticmethod
    def _builder(
        subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
    ) -> x509.CertificateBuilder:
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5))
            .not_valid_after(now + timedelta(days=1))
        )
