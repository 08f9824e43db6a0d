"""What `insurance.verify` does: ask the payer, estimate the cost, record it, announce it."""

from __future__ import annotations

from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from contracts import InsuranceVerified, VerifyInsurance, new_event
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.db import utcnow
from services.common.errors import PoisonMessage
from services.insurance.connectors import PayerConnector, PlanRules, self_pay_price
from services.insurance.estimate import CostEstimate, estimate_cost
from services.insurance.models import CoverageVerification

log = structlog.get_logger(__name__)

SOURCE = "/services/insurance"


def verify(
    cmd: VerifyInsurance,
    session: Session,
    settings: Settings,
    *,
    event_id: str,
    connector: PayerConnector | None = None,
) -> None:
    """Decide coverage for the case and queue `insurance.verified`; the caller commits."""
    price = self_pay_price(session, cmd.cpt)
    if price is None:
        raise PoisonMessage(
            f"CPT {cmd.cpt} has no self-pay price, so no estimate can be made; add an insurance_fees row "
            "without a plan for it, then replay the message from insurance.dlq"
        )
    coverage = cmd.coverage
    eligibility = None
    if coverage.plan_code and not coverage.self_pay:
        eligibility = (connector or PlanRules(session)).check(coverage, cmd.cpt)
    estimate = estimate_cost(coverage, cmd.cpt, eligibility, price)

    _record(session, cmd, estimate, event_id)
    verified = InsuranceVerified(
        case_id=cmd.case_id,
        coverage_status=estimate.coverage_status,
        plan_code=estimate.plan_code,
        cpt=cmd.cpt,
        allowed_amount=estimate.allowed_amount,
        patient_cost=estimate.patient_cost,
        explanation=estimate.explanation,
    )
    enqueue(
        session,
        EVENTS,
        new_event(id=f"{event_id}>insurance.verified", source=SOURCE, data=verified, subject=cmd.case_id),
    )
    log.info(
        "insurance.verified",
        case_id=cmd.case_id,
        coverage_status=estimate.coverage_status.value,
        plan_code=estimate.plan_code,
    )


def _record(session: Session, cmd: VerifyInsurance, estimate: CostEstimate, event_id: str) -> None:
    """Upsert the case's verification row."""
    row = session.exec(
        select(CoverageVerification).where(CoverageVerification.case_id == cmd.case_id)
    ).first()
    if row is None:
        row = CoverageVerification(case_id=cmd.case_id, source_event_id=event_id, **_fields(cmd, estimate))
        try:
            # A savepoint, so a concurrent insert for the same case becomes an update, not a lost message.
            with session.begin_nested():
                session.add(row)
            return
        except IntegrityError:
            row = session.exec(
                select(CoverageVerification).where(CoverageVerification.case_id == cmd.case_id)
            ).one()
    row.sqlmodel_update({"source_event_id": event_id, "verified_at": utcnow(), **_fields(cmd, estimate)})
    session.add(row)


def _fields(cmd: VerifyInsurance, estimate: CostEstimate) -> dict[str, Any]:
    return {
        "plan_code": estimate.plan_code,
        "coverage_status": estimate.coverage_status.value,
        "cpt": cmd.cpt,
        "allowed_amount": estimate.allowed_amount,
        "patient_cost": estimate.patient_cost,
        "explanation": estimate.explanation,
    }
