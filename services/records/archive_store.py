"""A DICOMweb archive (an existing VNA/PACS such as Orthanc) behind the records store: images are sent
with STOW-RS instead of being kept on disk, and read back with WADO-RS into a local cache, checked
against their SHA-256. Selected with RECORDS_STORAGE=dicomweb and RECORDS_ARCHIVE_URL."""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import httpx
from pydantic_settings import BaseSettings, SettingsConfigDict

ARCHIVE_PREFIX = "dicomweb:"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


class StorageSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RECORDS_", extra="ignore")

    storage: str = "disk"  # "disk" | "dicomweb"
    archive_url: str | None = None
    archive_auth_env: str | None = None  # an environment variable holding user:password
    archive_timeout_seconds: float = 60.0


@lru_cache
def get_storage_settings() -> StorageSettings:
    return StorageSettings()


class ArchiveUnavailable(Exception):
    """The archive refused or did not take the instance; nothing was indexed."""


@dataclass(frozen=True)
class DicomwebArchive:
    base_url: str
    auth_env: str | None = None
    timeout: float = 60.0

    def _client(self) -> httpx.Client:
        auth = None
        if self.auth_env:
            user, _, password = os.environ.get(self.auth_env, "").partition(":")
            auth = httpx.BasicAuth(user, password)
        return httpx.Client(base_url=self.base_url.rstrip("/"), auth=auth, timeout=self.timeout)

    def store(self, path: Path, study: str, series: str, sop: str) -> str:
        """STOW-RS one instance, streamed from disk; returns its storage reference."""

        def chunks() -> Iterator[bytes]:
            with path.open("rb") as fp:
                while chunk := fp.read(1024 * 1024):
                    yield chunk

        body, headers = stow_request(chunks())
        try:
            with self._client() as client:
                response = client.post("/studies", content=body, headers=headers)
        except httpx.HTTPError as exc:
            raise ArchiveUnavailable(f"the image archive did not answer ({type(exc).__name__})") from None
        if response.status_code != 200:
            raise ArchiveUnavailable(f"the image archive refused the instance (HTTP {response.status_code})")
        return f"{ARCHIVE_PREFIX}{study}/{series}/{sop}"

    def fetch(self, reference: str, target: Path, sha256: str, scratch: Path) -> None:
        """WADO-RS the instance into `target`, refusing bytes that are not the ones stored."""
        study, series, sop = reference.removeprefix(ARCHIVE_PREFIX).split("/")
        from services.records.multipart_related import (
            RelatedPartsReader,
        )  # imports the store, which imports us
        from services.records.store import ObjectStore

        store = ObjectStore(scratch)
        try:
            with (
                self._client() as client,
                client.stream(
                    "GET",
                    f"/studies/{study}/series/{series}/instances/{sop}",
                    headers={"Accept": ACCEPT_DICOM},
                ) as response,
            ):
                if response.status_code != 200:
                    raise ArchiveUnavailable(f"the image archive answered HTTP {response.status_code}")
                reader = RelatedPartsReader(
                    response.headers.get("content-type"),
                    store,
                    max_parts=1,
                    limit=1 << 40,
                    label="archive response",
                )
                for chunk in response.iter_bytes():
                    reader.feed(chunk)
                [entry] = reader.close()
        except httpx.HTTPError as exc:
            raise ArchiveUnavailable(f"the image archive did not answer ({type(exc).__name__})") from None
        if entry.received.sha256 != sha256:
            store.discard(entry.received)
            raise ArchiveUnavailable("the image archive returned other bytes than were stored")
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(entry.received.path, target)


def stow_request(instance: Iterable[bytes]) -> tuple[Iterator[bytes], dict[str, str]]:
    """One DICOM instance (its bytes, in chunks) as a STOW-RS request (PS3.18 10.5): body and headers."""
    boundary = uuid.uuid4().hex

    def body() -> Iterator[bytes]:
        yield f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield from instance
        yield f"\r\n--{boundary}--\r\n".encode()

    headers = {
        "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
        "Accept": "application/dicom+json",
    }
    return body(), headers


def archive_for(settings: StorageSettings) -> DicomwebArchive | None:
    if settings.storage != "dicomweb":
        return None
    if not settings.archive_url:
        raise RuntimeError("RECORDS_STORAGE=dicomweb needs RECORDS_ARCHIVE_URL")
    return DicomwebArchive(settings.archive_url, settings.archive_auth_env, settings.archive_timeout_seconds)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fp:
        while chunk := fp.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()
