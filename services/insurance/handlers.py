"""What the insurance service does: verify a case's coverage, record an authorization, withdraw on cancel.

Every effect is written with the `insurance.verified` it causes (outbox) in the caller's transaction.
"""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from typing import Any

import structlog
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from contracts import InsuranceVerified, VerifyInsurance, new_event
from contracts.events import CaseCancelled
from contracts.models import Coverage, CoverageStatus
from services.auth import tenancy
from services.common.amqp import EVENTS, enqueue
from services.common.config import Settings
from services.common.crashpoints import crash_point
from services.common.db import get_engine, utcnow
from services.common.errors import CaseError, PoisonMessage
from services.insurance.connectors import (
    Eligibility,
    PayerConnector,
    PlanRules,
    find_plan,
    network_status,
    plan_fee,
    self_pay_price,
)
from services.insurance.core import CoreLogin
from services.insurance.estimate import CostEstimate, estimate_cost, with_outcome
from services.insurance.models import AuthorizationCreate, CoverageVerification, InsurancePayer
from services.insurance.settings import InsuranceSettings, get_insurance_settings
from services.insurance.x12 import Party
from services.insurance.x12_connector import Subscriber, X12Connector

log = structlog.get_logger(__name__)

SOURCE = "/services/insurance"


class AuthorizationRefused(CaseError):
    """An authorization that cannot be recorded for the case as it stands (409 to the caller)."""


def connector_for(
    session: Session,
    coverage: Coverage,
    *,
    trace: str,
    cpt: str,
    settings: InsuranceSettings,
    subscriber: Subscriber | None = None,
) -> PayerConnector:
    """The plan's payer decides: `x12` asks the payer with a 270, anything else uses our plan rules."""
    plan = find_plan(session, coverage.plan_code)
    payer = session.get(InsurancePayer, plan.payer_id) if plan and plan.payer_id else None
    if plan is None or payer is None or payer.connector != "x12":
        return PlanRules(session, settings.reviewing_organization)
    network, _ = network_status(session, plan, settings.reviewing_organization)
    return X12Connector(
        payer,
        plan,
        provider=Party(settings.reviewing_organization.upper(), settings.reviewing_npi),
        network=network,
        allowed_amount=plan_fee(session, plan.code, cpt),
        trace=trace,
        attempts=settings.payer_attempts,
        backoff_seconds=settings.payer_backoff_seconds,
        subscriber=subscriber,
        usage=settings.x12_usage_indicator,
        login=CoreLogin.of(settings, payer.payer_id),
    )


def verify(
    cmd: VerifyInsurance,
    session: Session,
    settings: Settings,
    *,
    event_id: str,
    connector: PayerConnector | None = None,
    insurance_settings: InsuranceSettings | None = None,
) -> None:
    """Decide coverage for the case and queue `insurance.verified`; the caller commits."""
    tenancy.register_owner(
        get_engine("auth"), cmd.case_id, cmd.partner_id, cmd.patient.mrn if cmd.patient else None
    )
    config = insurance_settings or get_insurance_settings()
    row = _row(session, cmd.case_id)
    if row is not None and row.cancelled_at is not None:
        log.info("insurance.verify_ignored", case_id=cmd.case_id, why="case cancelled")
        return
    price = self_pay_price(session, cmd.cpt)
    if price is None:
        raise PoisonMessage(
            f"CPT {cmd.cpt} has no self-pay price, so no estimate can be made; add an insurance_fees row "
            "without a plan for it, then replay the message from insurance.dlq"
        )
    if row is not None and _still_fresh(row, cmd, config):
        estimate = _stored_estimate(row)
        authorization, rule = row.authorization, row.authorization_rule
        log.info("insurance.reverify_skipped", case_id=cmd.case_id, why="same coverage, not stale")
    else:
        estimate, rule = _check(
            session, cmd.coverage, cmd.cpt, price, cmd.case_id, config, connector, Subscriber.of(cmd.patient)
        )
        authorization = _authorization(rule, estimate, row)
    fields = {**_fields(cmd, estimate, authorization), "authorization_rule": rule}
    _upsert(session, cmd.case_id, event_id, fields)
    _announce(session, f"{event_id}>insurance.verified", cmd.case_id, cmd.cpt, estimate, authorization)


def authorize(case_id: str, body: AuthorizationCreate, session: Session) -> CoverageVerification:
    """Record a referral or prior-authorization number, re-verify, announce `satisfied`; caller commits."""
    if not (body.authorization_number or body.referral_document_id):
        raise AuthorizationRefused("send authorization_number or referral_document_id (one is required)")
    row = _row(session, case_id)
    if row is None:
        raise LookupError(case_id)
    if row.cancelled_at is not None:
        raise AuthorizationRefused(f"case {case_id} was cancelled; its coverage work was withdrawn")
    if row.authorization == "no-auth":
        raise AuthorizationRefused(
            f"the plan of case {case_id} needs no referral or prior authorization; nothing to record"
        )
    price = self_pay_price(session, row.cpt)
    coverage = Coverage(self_pay=row.self_pay, plan_code=row.plan_code, member_id=row.member_id)
    config = get_insurance_settings()
    if _young(row, config):
        # insurance.verify's 270 carried the patient's name and birth date; asked again without them (the row
        # keeps no PHI) a payer may refuse (AAA 73 / 58) and turn a covered case into "no-auth". A
        # verification still fresh is what the plan said; an old or failed one is asked again.
        estimate, rule = _stored_estimate(row), row.authorization_rule
    else:
        estimate, rule = _check(
            session, coverage, row.cpt, price or row.allowed_amount, case_id, config, None
        )
    # If the plan no longer covers the read, the authorization no longer matters.
    authorization = "satisfied" if estimate.coverage_status is CoverageStatus.COVERED else "no-auth"
    reference = body.authorization_number or f"referral:{body.referral_document_id}"
    event_id = f"{case_id}>insurance.authorized>{reference}"
    fields = {
        **_estimate_fields(estimate),
        "authorization": authorization,
        "authorization_rule": rule,
        "authorization_number": body.authorization_number,
        "referral_document_id": body.referral_document_id,
        "authorized_by": body.by,
    }
    # Locked (and read again) only now, not across the payer's answer: a cancellation that committed while
    # the payer was asked wins, and one that comes later waits for this commit.
    if _locked_row(session, case_id).cancelled_at is not None:
        raise AuthorizationRefused(
            f"case {case_id} was cancelled while the authorization was being recorded; nothing was recorded"
        )
    row = _upsert(session, case_id, event_id, fields)
    _announce(session, event_id, case_id, row.cpt, estimate, authorization)
    log.info(
        "insurance.authorization_recorded",
        case_id=case_id,
        kind="number" if body.authorization_number else "referral",
    )
    return row


def cancel(event: CaseCancelled, session: Session) -> None:
    """Withdraw the case's coverage work: later verify commands and authorizations are refused. Idempotent."""
    row = _row(session, event.case_id)
    if row is None:
        row = CoverageVerification(
            case_id=event.case_id,
            source_event_id="case.cancelled",
            coverage_status="self_pay",
            cpt="",
            allowed_amount=Decimal("0.00"),
            patient_cost=Decimal("0.00"),
            explanation="the case was cancelled before coverage was verified",
            outcome="withdrawn",
        )
    if row.cancelled_at is None:
        row.cancelled_at = utcnow()
        session.add(row)
        log.info("insurance.withdrawn", case_id=event.case_id)


def _check(
    session: Session,
    coverage: Coverage,
    cpt: str,
    price: Decimal,
    case_id: str,
    config: InsuranceSettings,
    connector: PayerConnector | None,
    subscriber: Subscriber | None = None,
) -> tuple[CostEstimate, str]:
    eligibility: Eligibility | None = None
    if coverage.plan_code and not coverage.self_pay:
        connector = connector or connector_for(
            session, coverage, trace=case_id, cpt=cpt, settings=config, subscriber=subscriber
        )
        eligibility = connector.check(coverage, cpt)
        crash_point("insurance.after_payer_call_before_record")
    estimate = with_outcome(estimate_cost(coverage, cpt, eligibility, price), eligibility)
    rule = eligibility.authorization_rule if eligibility is not None else "none"
    return estimate, rule


def _authorization(rule: str, estimate: CostEstimate, row: CoverageVerification | None) -> str:
    if rule == "none" or estimate.coverage_status != "covered":
        return "no-auth"
    if row is not None and row.authorization == "satisfied":
        return "satisfied"
    return "auth-needed"


def _still_fresh(row: CoverageVerification, cmd: VerifyInsurance, config: InsuranceSettings) -> bool:
    same = (row.plan_code or "", row.member_id, row.self_pay, row.cpt) == (
        (cmd.coverage.plan_code or "").strip().upper() if cmd.coverage.plan_code else "",
        cmd.coverage.member_id,
        cmd.coverage.self_pay,
        cmd.cpt,
    )
    return same and _young(row, config)


def _young(row: CoverageVerification, config: InsuranceSettings) -> bool:
    """Verified within the configured age, with an answer from the plan: not a failure to ask it (the payer
    did not answer, or refused our inquiry or our CORE login, which a fixed setting may cure)."""
    young = utcnow() - row.verified_at < timedelta(hours=config.verification_max_age_hours)
    return young and row.outcome not in {"payer_unavailable", "payer_rejected", ""}


def _stored_estimate(row: CoverageVerification) -> CostEstimate:
    return CostEstimate(
        CoverageStatus(row.coverage_status),
        row.plan_code,
        row.allowed_amount,
        row.patient_cost,
        row.explanation,
        network=row.network,
        copay=row.copay,
        deductible_applied=row.deductible_applied,
        deductible_remaining=row.deductible_remaining,
        coinsurance_pct=row.coinsurance_pct,
        coinsurance=row.coinsurance_amount,
        outcome=row.outcome,
    )


def _announce(
    session: Session, event_id: str, case_id: str, cpt: str, estimate: CostEstimate, authorization: str
) -> None:
    verified = InsuranceVerified(
        case_id=case_id,
        coverage_status=estimate.coverage_status,
        plan_code=estimate.plan_code,
        cpt=cpt,
        allowed_amount=estimate.allowed_amount,
        patient_cost=estimate.patient_cost,
        explanation=estimate.explanation,
        authorization=authorization,
        network=estimate.network,
        outcome=estimate.outcome,
        copay=estimate.copay,
        deductible_applied=estimate.deductible_applied,
        deductible_remaining=estimate.deductible_remaining,
        coinsurance=estimate.coinsurance,
    )
    enqueue(session, EVENTS, new_event(id=event_id, source=SOURCE, data=verified, subject=case_id))
    log.info(
        "insurance.verified",
        case_id=case_id,
        coverage_status=estimate.coverage_status.value,
        plan_code=estimate.plan_code,
        outcome=estimate.outcome,
        authorization=authorization,
    )


def _row(session: Session, case_id: str) -> CoverageVerification | None:
    return session.exec(select(CoverageVerification).where(CoverageVerification.case_id == case_id)).first()


def _locked_row(session: Session, case_id: str) -> CoverageVerification:
    query = select(CoverageVerification).where(CoverageVerification.case_id == case_id).with_for_update()
    return session.exec(query.execution_options(populate_existing=True)).one()


def _upsert(session: Session, case_id: str, event_id: str, fields: dict[str, Any]) -> CoverageVerification:
    """Insert or update the case's verification row."""
    row = _row(session, case_id)
    if row is None:
        row = CoverageVerification(case_id=case_id, source_event_id=event_id, **fields)
        try:
            # A savepoint, so a concurrent insert for the same case becomes an update, not a lost message.
            with session.begin_nested():
                session.add(row)
            return row
        except IntegrityError:
            row = session.exec(
                select(CoverageVerification).where(CoverageVerification.case_id == case_id)
            ).one()
    row.sqlmodel_update({"source_event_id": event_id, "verified_at": utcnow(), **fields})
    session.add(row)
    return row


def _estimate_fields(estimate: CostEstimate) -> dict[str, Any]:
    return {
        "plan_code": estimate.plan_code,
        "coverage_status": estimate.coverage_status.value,
        "allowed_amount": estimate.allowed_amount,
        "patient_cost": estimate.patient_cost,
        "explanation": estimate.explanation,
        "outcome": estimate.outcome,
        "network": estimate.network,
        "copay": estimate.copay,
        "deductible_applied": estimate.deductible_applied,
        "deductible_remaining": estimate.deductible_remaining,
        "coinsurance_pct": estimate.coinsurance_pct,
        "coinsurance_amount": estimate.coinsurance,
    }


def _fields(cmd: VerifyInsurance, estimate: CostEstimate, authorization: str) -> dict[str, Any]:
    return {
        **_estimate_fields(estimate),
        "cpt": cmd.cpt,
        "member_id": cmd.coverage.member_id,
        "self_pay": cmd.coverage.self_pay,
        "patient_state": cmd.patient_state,
        "authorization": authorization,
    }


def estimate_for(
    session: Session, coverage: Coverage, cpt: str, trace: str, subscriber: Subscriber | None = None
) -> tuple[CostEstimate, str]:
    """Ask the plan's connector and estimate, without recording anything (the FHIR eligibility request).

    Returns the estimate and the plan's authorization rule; raises LookupError if `cpt` has no self-pay price.
    """
    price = self_pay_price(session, cpt)
    if price is None:
        raise LookupError(cpt)
    return _check(session, coverage, cpt, price, trace, get_insurance_settings(), None, subscriber)
