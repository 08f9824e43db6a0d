"""Errors that carry what went wrong and what to do."""


class CaseError(Exception):
    """Base of every domain error of the platform."""


class IntakeRejected(CaseError):
    """A request that can never succeed as sent: a 4xx to the caller, never retried."""


class PoisonMessage(CaseError):
    """A message no retry can fix (malformed, unknown type): dead-lettered at once."""


class RecordsRejected(CaseError):
    """An upload that cannot be stored as sent: a 4xx to the uploader, nothing stored."""


def human_size(n: int) -> str:
    """A size as a person reads it in an error: "512 MiB", "1.5 GiB", "700 bytes"."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.4g} {unit}"
    return f"{n} bytes"
