"""Errors that carry what went wrong and what to do."""


class CaseError(Exception):
    """Base of every domain error of the platform."""


class IntakeRejected(CaseError):
    """A request that can never succeed as sent: a 4xx to the caller, never retried."""


class PoisonMessage(CaseError):
    """A message no retry can fix (malformed, unknown type): dead-lettered at once."""


class RecordsRejected(CaseError):
    """An upload that cannot be stored as sent: a 4xx to the uploader, nothing stored."""
