"""pydantic's validation errors said by field, never by value: what a caller sent may be PHI (no I/O here, so
the workflow's sandbox may import it)."""

from __future__ import annotations

from pydantic import ValidationError


def _field(loc: tuple[int | str, ...], whole: str) -> str:
    return ".".join(str(part) for part in loc) or whole


def fields_of(invalid: ValidationError, *, whole: str = "data", most: int | None = None) -> str:
    """`a.b, c`: the fields at fault (`whole` when the input itself is), at most `most` of them."""
    return ", ".join(_field(e["loc"], whole) for e in invalid.errors()[:most])


def problems_of(invalid: ValidationError, *, whole: str = "input", most: int | None = None) -> str:
    """`a.b: Field required; c: Input should be a valid integer`: each field at fault with pydantic's rule."""
    return "; ".join(f"{_field(e['loc'], whole)}: {e['msg']}" for e in invalid.errors()[:most])
