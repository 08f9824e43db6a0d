"""A partner's order reference: a FHIR Identifier (`system` + `value`) that names one case at most.

Two hospitals behind one integration partner may number their orders alike, so the reference is the pair:
(partner, system, value), with "no system" a namespace of its own. A search reads it as FHIR token search
does (R4 search.html#token): `identifier=value` any system, `identifier=|value` no system,
`identifier=system|value` exactly that.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SYSTEM_MAX_LENGTH = 255
# An absolute URI (RFC 3986 section 4.3): a scheme, then only the characters a URI may carry.
_ABSOLUTE_URI = re.compile(
    r"[A-Za-z][A-Za-z0-9+.-]*:(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?#\[\]]|%[0-9A-Fa-f]{2})+"
)
SYSTEM_RULE = (
    "an identifier system must be an absolute URI (RFC 3986) of at most 255 characters, "
    "e.g. urn:oid:2.16.840.1.113883.19.5 or https://hospital.example/orders"
)


def is_identifier_system(text: str) -> bool:
    """True if `text` may be an Identifier.system: an absolute URI, without spaces or control characters."""
    return len(text) <= SYSTEM_MAX_LENGTH and _ABSOLUTE_URI.fullmatch(text) is not None


@dataclass(frozen=True)
class ReferenceSearch:
    """What `identifier=...` asks for: `value` under `system` (None: no system), or under any system."""

    value: str
    system: str | None = None
    any_system: bool = False


class SearchInvalid(ValueError):
    """An `identifier` search that cannot be read; the message names the rule, never the value."""


def parse_token(token: str) -> ReferenceSearch:
    """Read `[system|]value` with FHIR's escapes (`\\|`, `\\,`, `\\$`, `\\\\`); split at the first unescaped `|`.
    An unescaped `,` (FHIR's OR) is refused: a conditional create is for one order."""
    parts: list[str] = [""]
    escaped = False
    for char in token:
        if escaped:
            parts[-1] += char
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|" and len(parts) == 1:
            parts.append("")
        elif char == ",":  # FHIR's OR between values: a conditional create names one order
            raise SearchInvalid(
                "identifier=a,b (any of several) cannot name the one order a conditional create is for; send "
                "its one identifier, and escape a comma that belongs to it as \\,"
            )
        else:
            parts[-1] += char
    if escaped:
        raise SearchInvalid("identifier ends in a lone backslash; escape it as \\\\")
    if len(parts) == 1:
        system, value, any_system = None, parts[0], True
    else:
        system, value, any_system = parts[0] or None, parts[1], False
    if not value:
        raise SearchInvalid("conditional create searches identifier=[system|]value with a value")
    if "\x00" in value:
        raise SearchInvalid("the identifier's value contains a NUL character, which no reference holds")
    if system is not None and not is_identifier_system(system):
        raise SearchInvalid(f"the identifier's system is not valid: {SYSTEM_RULE}")
    return ReferenceSearch(value=value, system=system, any_system=any_system)
