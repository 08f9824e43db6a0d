"""Retrieval from a facility that offers DICOMweb: QIDO-RS finds the study, WADO-RS streams it to disk."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

from services.records.archive import Entry
from services.records.dimse import PacsUnavailable, StudyQuery
from services.records.multipart_related import RelatedPartsReader
from services.records.store import ObjectStore

ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'


@dataclass(frozen=True)
class DicomwebSource:
    base_url: str
    auth_env: str | None = None
    timeout: float = 30.0

    def client(self) -> httpx.Client:
        auth = None
        if self.auth_env:
            user, _, password = os.environ.get(self.auth_env, "").partition(":")
            auth = httpx.BasicAuth(user, password)
        try:
            return httpx.Client(base_url=self.base_url.rstrip("/"), auth=auth, timeout=self.timeout)
        except httpx.InvalidURL:  # not an HTTPError: it escaped the callers' handling and failed their loop
            raise PacsUnavailable(
                "the partner's DICOMweb URL cannot be called (not a valid URL); PUT /v1/records/sources "
                "with a corrected one"
            ) from None


def find_studies(source: DicomwebSource, query: StudyQuery) -> list[str]:
    params = query.keys()
    try:
        with source.client() as client:
            response = client.get("/studies", params=params, headers={"Accept": "application/dicom+json"})
    except httpx.HTTPError as exc:
        raise PacsUnavailable(f"QIDO-RS failed ({type(exc).__name__})") from None
    if response.status_code == 204:
        return []
    if response.status_code != 200:
        raise PacsUnavailable(f"QIDO-RS answered HTTP {response.status_code}")
    return [str(s["0020000D"]["Value"][0]) for s in response.json() if s.get("0020000D", {}).get("Value")]


def get_study(
    source: DicomwebSource, study_uid: str, store: ObjectStore, *, limit: int, max_parts: int
) -> list[Entry]:
    try:
        with (
            source.client() as client,
            client.stream("GET", f"/studies/{study_uid}", headers={"Accept": ACCEPT_DICOM}) as response,
        ):
            if response.status_code != 200:
                raise PacsUnavailable(f"WADO-RS answered HTTP {response.status_code}")
            reader = RelatedPartsReader(
                response.headers.get("content-type"),
                store,
                max_parts=max_parts,
                limit=limit,
                label="WADO-RS response",
            )
            try:
                for chunk in response.iter_bytes():
                    reader.feed(chunk)
            except BaseException:
                reader.abort()
                raise
            return reader.close()
    except httpx.HTTPError as exc:
        raise PacsUnavailable(f"WADO-RS failed ({type(exc).__name__})") from None
