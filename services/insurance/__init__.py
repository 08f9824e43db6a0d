"""Insurance: eligibility and the patient's out-of-pocket estimate for a second-opinion read.

Consumes `insurance.verify`, asks a payer connector about the member's plan, estimates the patient's
cost and publishes `insurance.verified`. `PlanRules` (plan rules kept in this service's database) is
the first connector; X12 270/271 and FHIR CoverageEligibilityRequest connectors come later.
"""
