"""A payer sandbox: answers X12 270 eligibility inquiries with 271s from the members in `members.json`.

Transport: the CAQH CORE Connectivity Rule vC2.2.0, real time, in both envelope standards. HTTP MIME
multipart: `POST /core/eligibility` a `multipart/form-data` envelope (PayloadType
`X12_270_Request_005010X279A1`, ProcessingMode `RealTime`, PayloadID, TimeStamp, UserName, Password, SenderID,
ReceiverID, CORERuleVersion `2.2.0`, Payload); the answer is the same envelope with PayloadType
`X12_271_Response_005010X279A1`, the PayloadID echoed and ErrorCode `Success`. The login and the senders it
accepts are `payer.core` in `members.json` (the insurance service's default `INSURANCE_CORE_*` settings match
them). An envelope it does not take is answered with PayloadType `CoreEnvelopeError` and its ErrorCode:
`UnAuthorized` (HTTP 401) for a wrong or missing login, `Sender/ReceiverNotAuthorized` (403) for a SenderID it
does not know or a ReceiverID that is not this payer, `<Field>Required`, `<Field>Illegal` or `VersionMismatch`
(400) for the rest.

The rule's other envelope standard, SOAP 1.2 + WSDL, on its own endpoint: `POST /core/soap` a SOAP 1.2 envelope
(`application/soap+xml`) whose Body is `COREEnvelopeRealTimeRequest` (namespace
`http://www.caqh.org/SOAP/WSDL/CORERule2.2.0.xsd`, its children unqualified) and whose Header carries the login
as a WS-Security `wsse:UsernameToken` (Username, Password of type PasswordText), or no token with the X.509
login below. The answer is a `COREEnvelopeRealTimeResponse` with the same fields and ErrorCodes as the MIME
answer (HTTP 200); a login it does not take is a SOAP Fault env:Sender with subcode `wsse:FailedAuthentication`
(`wsse:InvalidSecurity` without a token; HTTP 400), and CORE `Busy` is a Fault env:Receiver (HTTP 500). The
request is read with defusedxml, independently of the insurance service's reader. With `PAYER_SANDBOX_MTOM` set
(to anything but `0`), the SOAP endpoint answers as a SOAP stack with MTOM on does: every answer (Faults too) is a
`multipart/related; type="application/xop+xml"` XOP package whose root part is the envelope, and a 271's Payload
is `<xop:Include href="cid:..."/>` naming a part of its own (its Content-ID %-encoded in the href).

Members misbehave on request: `reject: "42"` or `busy_first: N` (AAA 42), `core_busy_first: N` (the envelope's
ErrorCode `Busy`, or the SOAP Receiver fault, for the member's first N inquiries), `delay_seconds`, `garbled` (a
Payload that is not X12), `answer_payload_id` (an answer carrying another request's PayloadID),
`require_name` (AAA 73 for a 270 without the subscriber's name).

Run it with `python -m tests.payer_sandbox [PORT]` (or `PAYER_SANDBOX_PORT`); `PAYER_SANDBOX_MEMBERS` names
another members file. HTTPS with `PAYER_SANDBOX_TLS_CERT` and `PAYER_SANDBOX_TLS_KEY` (PEM files); with
`PAYER_SANDBOX_CLIENT_CA` too, mutual TLS: a client certificate from that CA is required, and one whose subject
common name is in `payer.core.certificate_subjects` is the login (CORE's X.509 standard: no UserName or
Password in the envelope). A server of other TLS habits than ours: `PAYER_SANDBOX_TLS_MIN_VERSION` and
`PAYER_SANDBOX_TLS_MAX_VERSION` (`ssl.TLSVersion` names: `TLSv1_2` makes a client certificate's absence a
`handshake_failure` alert, as under TLS 1.2 it is) and `PAYER_SANDBOX_TLS_CIPHERS` (an OpenSSL cipher list).
"""
