"""QIDO-RS Empty Value Matching and Multiple Value Matching (PS3.18 8.3.4.5, 8.3.4.6; PS3.4 C.2.2.2.7,
C.2.2.2.8), asked for with `emptyvaluematching=true` and `multiplevaluematching=true`.

- Empty Value Matching: a key whose value is `""` (two quotation marks) matches the entities whose attribute is
  empty or absent (a study with no Study Date, an instance with no Instance Number). An empty value (`key=`)
  stays universal matching, as PS3.4 C.2.2.2.3 has it.
- Multiple Value Matching: a key's value may be several, separated by commas (PS3.18 8.3.4.1) or backslashes
  (DICOM's value delimiter); an entity matches when any of them does (each with its own wildcards or range).
  UID lists, Modality, Modalities in Study, SOP Class UID, Series and Instance Number take lists always.

Without the parameter (or `false`) `""` is a value like any other and a list is one value. A parameter that is
neither true nor false is a 400.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from fastapi import HTTPException, Request

EMPTY = '""'


@dataclass(frozen=True)
class Matching:
    empty: bool = False
    multiple: bool = False

    def wants_empty(self, value: str | None) -> bool:
        """Whether `value` asks for the entities whose attribute is empty or absent."""
        return self.empty and value == EMPTY

    def values(self, value: str) -> list[str]:
        """The values a key gives: several with Multiple Value Matching, else the one."""
        return [v for v in re.split(r"[,\\]", value) if v] if self.multiple else [value]


def matching(request: Request) -> Matching:
    return Matching(
        empty=_flag(request, "emptyvaluematching", "8.3.4.5"),
        multiple=_flag(request, "multiplevaluematching", "8.3.4.6"),
    )


def _flag(request: Request, name: str, section: str) -> bool:
    value = request.query_params.get(name)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise HTTPException(400, f"{name} is true or false (PS3.18 {section}); the value given is neither")
    return value.lower() == "true"
