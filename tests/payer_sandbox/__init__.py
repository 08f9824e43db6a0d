"""A payer sandbox: answers X12 270 eligibility inquiries with 271s from the members in `members.json`.

Transport (CAQH CORE real-time, simplified): `POST /core/eligibility` with the 270 as the body
(`Content-Type: application/EDI-X12`, header `PayloadType: X12_270_Request_005010X279A1`); the answer
is the 271 as the body with `PayloadType: X12_271_Response_005010X279A1`. CORE's MIME multipart and SOAP
envelopes carry the same payload; a body-only POST keeps the peer small. Run it with
`python -m tests.payer_sandbox [PORT]` (or `PAYER_SANDBOX_PORT`); `PAYER_SANDBOX_MEMBERS` names another
members file.
"""
