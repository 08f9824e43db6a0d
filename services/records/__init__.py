"""Records: imports a case's outside study and original report, reconciles it to the case's patient,
judges its completeness and technical adequacy, and says when the set is complete.

Sources of images, all ending in `uploads.accept_entries` (validated, reconciled, stored as a whole):
uploads of files, folders and CDs as ZIP with or without DICOMDIR (`/v1/records/{case_id}/files`, which
also takes the report as PDF, text or FHIR DiagnosticReport, and FHIR Observation / DocumentReference),
DICOMweb STOW-RS (`/dicomweb/...`, instance by instance: `stow`), and query/retrieve from the partner's PACS (`retrieval`: DIMSE
C-FIND + C-GET/C-MOVE, or DICOMweb QIDO/WADO). Consumes `records.collect`, `records.remind`,
`records.reconcile` and `case.cancelled`; publishes `records.assembled`, `records.incomplete`,
`records.needed` and `records.identity_mismatch`. `GET /v1/records/{case_id}/timeline` orders it all by
date; `/v1/records/{case_id}/export/deidentified` gives the images de-identified (PS3.15 Annex E,
Table E.1-1, burned-in text outside the ultrasound regions blanked: `deidentify`).
Stores the second-opinion report (`document.encapsulated_report`) placed into the study it reads
(`second_opinion`, `report_study`), hands it out by the UID the review service issued it under
(`/v1/records/{case_id}/second-opinion/{uid}`) and sends it back to the facility's PACS (`report_return`).

Errors (STOW-RS answers per instance instead, an instance over the size limit too, see `stow`; a malformed
body 400, a media type 415, too many parts 413):
    RecordsRejected          (422: unusable or hostile input; nothing stored)
    RecordsNotRequested      (404), RecordsCancelled (409)
    FileTooLarge             (413)
    ArchiveUnavailable       (503 on upload; retried for retrievals)
    PacsUnavailable          (retried with backoff, then reported as records.incomplete)
"""
