"""The platform's own DICOM implementation identity (PS3.7 D.3.3.2, PS3.10 7.1): the Implementation Class UID
and Version Name our associations carry and the files we write name, not the toolkit's (pynetdicom's, pydicom's),
so a PACS administrator reading an association log or a file's meta information sees who it was."""

from __future__ import annotations

# A UUID-derived UID (PS3.5 B.2: "2.25." and the UUID as one decimal integer): uuid5(NAMESPACE_URL,
# "urn:secondopinion:implementation"), fixed, so one value names this implementation everywhere.
IMPLEMENTATION_CLASS_UID = "2.25.174650663783160190740033383284943218544"
# SH, at most 16 characters: changed with a release that changes what goes over the wire or into files.
IMPLEMENTATION_VERSION_NAME = "SECONDOPINION_01"
