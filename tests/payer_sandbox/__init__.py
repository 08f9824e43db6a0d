"""A payer sandbox: answers X12 270 eligibility inquiries with 271s from the members in `members.json`.

Transport: the CAQH CORE Connectivity Rule vC2.2.0, HTTP MIME multipart, real time. `POST /core/eligibility`
a `multipart/form-data` envelope (PayloadType `X12_270_Request_005010X279A1`, ProcessingMode `RealTime`,
PayloadID, TimeStamp, UserName, Password, SenderID, ReceiverID, CORERuleVersion `2.2.0`, Payload); the
answer is the same envelope with PayloadType `X12_271_Response_005010X279A1`, the PayloadID echoed and
ErrorCode `Success`. The login and the senders it accepts are `payer.core` in `members.json` (the insurance
service's default `INSURANCE_CORE_*` settings match them). An envelope it does not take is answered with
PayloadType `CoreEnvelopeError` and its ErrorCode: `UnAuthorized` (HTTP 401) for a wrong or missing login,
`Sender/ReceiverNotAuthorized` (403) for a SenderID it does not know or a ReceiverID that is not this payer,
`<Field>Required`, `<Field>Illegal` or `VersionMismatch` (400) for the rest.

Members misbehave on request: `reject: "42"` or `busy_first: N` (AAA 42), `delay_seconds`, `garbled` (a
Payload that is not X12), `answer_payload_id` (an answer carrying another request's PayloadID),
`require_name` (AAA 73 for a 270 without the subscriber's name).

Run it with `python -m tests.payer_sandbox [PORT]` (or `PAYER_SANDBOX_PORT`); `PAYER_SANDBOX_MEMBERS` names
another members file. HTTPS with `PAYER_SANDBOX_TLS_CERT` and `PAYER_SANDBOX_TLS_KEY` (PEM files); with
`PAYER_SANDBOX_CLIENT_CA` too, mutual TLS: a client certificate from that CA is required, and one whose subject
common name is in `payer.core.certificate_subjects` is the login (CORE's X.509 standard: no UserName or
Password in the envelope).
"""
