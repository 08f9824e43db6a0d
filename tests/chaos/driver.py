"""Drives one case through the real APIs while processes die: each call does the next step for the state the
workflow reports, and every step is safe to repeat (Idempotency-Key on the case, the same files on a
re-upload, updates refused once applied), so an error only means "try again on the next pass"."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pydicom.uid
from temporalio.client import Client

from contracts.decisions import CloseCase, CostChoice, CostDecision
from contracts.models import CaseStatus
from scripts.demo import FINDINGS, ORIGINAL_REPORT, SAMPLE_CASE
from scripts.synthetic_study import make_us_instance
from services.common.config import Settings
from services.common.temporal import connect_temporal

DICOM_FILES = 3  # two images and one cine clip per study


@dataclass
class ChaosCase:
    number: int
    run_id: str
    case_id: str | None = None
    status: str = "not created"
    study_uid: str = field(default_factory=pydicom.uid.generate_uid)
    files: list[tuple[str, tuple[str, bytes, str]]] = field(default_factory=list)
    errors: int = 0
    release_at: float = 0.0  # monotonic time from which the hospital sends the request

    @property
    def ref(self) -> str:
        return f"CHAOS-{self.run_id}-{self.number:03d}"

    @property
    def done(self) -> bool:
        return self.status == CaseStatus.CLOSED.value

    def request(self, partner_id: str) -> dict[str, Any]:
        patient = dict(SAMPLE_CASE["patient"], mrn=self.ref)
        return dict(SAMPLE_CASE, partner_id=partner_id, partner_case_ref=self.ref, patient=patient)

    def upload(self) -> list[tuple[str, tuple[str, bytes, str]]]:
        """The same bytes on every attempt, so a re-upload after a crash stores nothing new."""
        if not self.files:
            patient = SAMPLE_CASE["patient"]
            series_uid = pydicom.uid.generate_uid()
            common: dict[str, Any] = {
                "study_uid": self.study_uid,
                "series_uid": series_uid,
                "patient_name": f"{patient['family_name'].upper()}^{patient['given_name'].upper()}",
                "patient_id": self.ref,
                "birth_date": patient["birth_date"].replace("-", ""),
                "sex": "F",
            }
            frames = [1] * (DICOM_FILES - 1) + [12]
            self.files = [("files", ("report.txt", ORIGINAL_REPORT.encode(), "text/plain"))] + [
                ("files", (f"IM{i:04d}.dcm", make_us_instance(None, frames=n, **common), "application/dicom"))
                for i, n in enumerate(frames, 1)
            ]
        return self.files


class Driver:
    """Acts as hospital, facility, patient, specialist and referrer for every case of the run."""

    def __init__(
        self,
        settings: Settings,
        partner: dict[str, str],
        operations_key: str,
        signing_key: Callable[[str], str],
    ) -> None:
        self.settings = settings
        self.partner = partner
        self.partner_http = httpx.AsyncClient(
            timeout=20, headers={"Authorization": f"Bearer {partner['api_key']}"}
        )
        self.staff_http = httpx.AsyncClient(timeout=20, headers={"Authorization": f"Bearer {operations_key}"})
        self.signing_key = signing_key  # issues a reviewer's own key: only it submits findings
        self.signing_keys: dict[str, str] = {}
        self._client: Client | None = None

    async def client(self) -> Client:
        if self._client is None:
            self._client = await connect_temporal(self.settings)
        return self._client

    async def close(self) -> None:
        await self.partner_http.aclose()
        await self.staff_http.aclose()

    async def step(self, case: ChaosCase) -> None:
        try:
            await self._step(case)
        except Exception:
            case.errors += 1  # a process is down or restarting: the next pass tries again
            if self._client is not None and case.errors % 10 == 0:
                self._client = None  # reconnect to a restarted Temporal dev server

    async def _step(self, case: ChaosCase) -> None:
        if case.case_id is None:
            await self._create(case)
            return
        handle = (await self.client()).get_workflow_handle(f"case-{case.case_id}")
        status = CaseStatus(await handle.query("status")).value
        case.status = status
        if status == CaseStatus.AWAITING_RECORDS.value:
            response = await self.partner_http.post(
                f"{self.settings.records_url}/v1/records/{case.case_id}/files", files=case.upload()
            )
            if response.status_code not in (200, 201, 404):  # 404: the request is still on its way
                response.raise_for_status()
        elif status == CaseStatus.AWAITING_PATIENT_DECISION.value:
            decision = CostDecision(choice=CostChoice.ACCEPT, by="chaos-patient", reason="accepted")
            await handle.execute_update("decide_cost", decision)
        elif status in (CaseStatus.AWAITING_ACCEPTANCE.value, CaseStatus.IN_REVIEW.value):
            await self._review(case, await handle.query("review"))
        elif status == CaseStatus.FOLLOW_UP.value:
            await handle.execute_update("close", CloseCase(by="chaos-referrer", reason="no questions"))

    async def _create(self, case: ChaosCase) -> None:
        response = await self.partner_http.post(
            f"{self.settings.intake_url}/v1/cases",
            json=case.request(self.partner["partner_id"]),
            headers={"Idempotency-Key": case.ref},
        )
        response.raise_for_status()
        case.case_id = response.json()["case_id"]
        case.status = response.json().get("status", "intake")

    async def _review(self, case: ChaosCase, review: Any) -> None:
        if review is None:
            return
        review = review.model_dump() if hasattr(review, "model_dump") else review
        reviews = f"{self.settings.review_url}/v1/reviews/{review['review_id']}"
        params = {"reviewer": review["reviewer_id"]}
        if not review["accepted"]:
            response = await self.staff_http.post(f"{reviews}/accept", params=params)
        else:
            reviewer = review["reviewer_id"]
            if reviewer not in self.signing_keys:
                try:
                    self.signing_keys[reviewer] = await asyncio.to_thread(self.signing_key, reviewer)
                except (
                    subprocess.SubprocessError
                ):  # the console could not issue it now: the next step retries
                    return
            signed = {"Authorization": f"Bearer {self.signing_keys[reviewer]}"}
            response = await self.staff_http.post(reviews, json=FINDINGS, headers=signed)
        if response.status_code != 409:  # 409: already accepted / submitted by an earlier attempt
            response.raise_for_status()


def new_run_id() -> str:
    return secrets.token_hex(3)
