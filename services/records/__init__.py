"""Records: collects the original report and the DICOM images of a case and says when the set is complete.

Consumes `records.collect`; accepts uploads at `POST /v1/records/{case_id}/files`; stores every file
content-addressed under `data_dir/records/objects/`; publishes `records.assembled` once per case.
"""
