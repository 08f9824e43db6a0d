"""Insurance: eligibility, network status, authorization and the patient's out-of-pocket estimate.

Consumes `insurance.verify` and `case.cancelled`. A verify asks the plan's payer connector (its payer's
`connector` in `insurance_payers`: `plan_rules`, our own tables, or `x12`, a 270 to the payer's endpoint in a
CAQH CORE envelope, HTTP MIME multipart or SOAP 1.2 (its answer plain or MTOM) as the payer's `core_envelope`
says, logged in with the `INSURANCE_CORE_*` settings), estimates the patient's cost for CPT 76140 (or the
study's CPT with modifier 26) and publishes `insurance.verified` with the coverage status, a specific
outcome, the network status and whether a referral or prior authorization is needed.
`POST /v1/coverage/{case_id}/authorization` records one and publishes `insurance.verified` again with
`satisfied`.

Errors::

    CaseError
      + PoisonMessage            (a command no retry can fix: dead-lettered)
      + AuthorizationRefused     (409: the case needs none, or was cancelled)
    X12Invalid                   (a 270/271 that fails pyx12 or the 005010X279A1 rules: `malformed_response`)
      + X12Acknowledged          (a TA1 or 999 instead of the 271: `payer_rejected`)
    PayerBusy                    (timeout, refused connection, HTTP 5xx, CORE Busy, a SOAP Receiver fault,
                                  AAA 42: retried with backoff, then `payer_unavailable`)
    CoreRefused                  (the CORE envelope's ErrorCode is an error: `payer_rejected`)
      + CoreLoginRefused         (our CORE login or sender refused, e.g. a SOAP wsse:FailedAuthentication
                                  fault or a TLS alert about our client certificate: `payer_rejected`,
                                  naming the settings)
    CoreLoginUnusable            (our certificate, key or CA bundle cannot be used: `payer_rejected`)
    CoreTlsRefused               (no TLS version or cipher suite in common with the payer: `payer_rejected`,
                                  not retried, not called a login problem)
    CoreEnvelopeInvalid          (not a CORE envelope answering our request, e.g. an MTOM xop:Include naming
                                  a part the answer lacks: `malformed_response`)
    FhirInvalid                  (422 OperationOutcome naming the element)
"""
