"""The integrated report's DICOM instance as the records service holds it, for the review API's DICOM download.

This service issues the Encapsulated PDF (encapsulated_pdf.py) with the identity intake gave; records places
it into the study it reads, with that study's identity as its images have it (and, in another study, under
another SOP Instance UID). Handing out our own copy would put one SOP Instance UID into a PACS with two
identities, so the download serves records' copy. It is fetched with the caller's own key: records checks and
audits that caller as well, and no service holds a key that reads every case.

    RecordsCopyUnavailable
      + NotPlacedYet         (409 with Retry-After: records has not stored or placed the instance yet)
      + RecordsUnreachable   (503 with Retry-After: records did not answer, or answered with an error)
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Annotated

import httpx
import structlog
from fastapi import Depends

from services.review.deps import SettingsDep

log = structlog.get_logger(__name__)

DICOM = "application/dicom"
RECORDS_TIMEOUT_SECONDS = 30.0  # a report instance is tens of kB: records answers in well under a second


class RecordsCopyUnavailable(Exception):
    status_code = 503

    def __init__(self, detail: str, retry_after: str) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class NotPlacedYet(RecordsCopyUnavailable):
    status_code = 409


class RecordsUnreachable(RecordsCopyUnavailable):
    status_code = 503


@dataclass(frozen=True)
class RecordsCopy:
    dicom: bytes
    location: str | None  # records' WADO-RS URL of the instance (its own UID when placed in another study)


def records_client(settings: SettingsDep) -> httpx.Client:
    return _pooled_client(settings.records_url)


@lru_cache
def _pooled_client(base_url: str) -> httpx.Client:
    """One client (and connection pool) per records URL for the life of the process."""
    return httpx.Client(base_url=base_url, timeout=RECORDS_TIMEOUT_SECONDS)


RecordsClient = Annotated[httpx.Client, Depends(records_client)]


def fetch_records_copy(
    client: httpx.Client, *, case_id: str, issued_uid: str, authorization: str
) -> RecordsCopy:
    """Records' copy of the report instance issued as `issued_uid`, asked for with the caller's key."""
    path = f"/v1/records/{case_id}/second-opinion/{issued_uid}"
    try:
        response = client.get(path, headers={"Authorization": authorization, "Accept": DICOM})
    except httpx.HTTPError as exc:
        log.warning("review.records_copy_unreachable", case_id=case_id, error=type(exc).__name__)
        raise RecordsUnreachable(
            "the records service, which holds the report instance placed into the study, did not answer; "
            "retry in a moment, or ask for application/pdf",
            "30",
        ) from None
    if response.status_code == 200:
        return RecordsCopy(response.content, response.headers.get("Content-Location"))
    retry_after = response.headers.get("Retry-After") or "30"
    if response.status_code == 404:
        raise NotPlacedYet(
            "records has not stored this version of the report yet (it does seconds after the report is "
            "issued, and not for a cancelled case); it is served once records has placed it into the "
            "study; retry, or ask for application/pdf",
            retry_after,
        )
    if response.status_code == 409:
        raise NotPlacedYet(f"{_detail(response)}; or ask for application/pdf meanwhile", retry_after)
    log.warning("review.records_copy_refused", case_id=case_id, status=response.status_code)
    raise RecordsUnreachable(
        f"the records service could not hand out the report instance (HTTP {response.status_code}); "
        "retry later, or ask for application/pdf",
        retry_after,
    )


def _detail(response: httpx.Response) -> str:
    """Records' problem detail (why it has not placed the instance, and what to do); never PHI."""
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return str(detail) if detail else "records has not placed the report into the study yet; retry later"
