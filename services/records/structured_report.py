"""The text of a DICOM Structured Report (the first reader's report sent as SR), for the specialist.

The content tree is walked in order: containers become headings, TEXT / CODE / NUM / DATE items become
`Concept: value` lines. Nothing here is logged (the text is PHI).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

SR_MODALITY = "SR"
MAX_DEPTH = 20  # a hostile tree cannot recurse without end


def sr_text(path: Path) -> str:
    dataset = pydicom.dcmread(path, stop_before_pixels=True)
    lines: list[str] = []
    title = _meaning(dataset.get("ConceptNameCodeSequence"))
    if title:
        lines.append(title.upper())
    _walk(dataset.get("ContentSequence") or [], lines, depth=0)
    return "\n".join(line for line in lines if line.strip()).strip()


def _walk(items: list[Dataset], lines: list[str], depth: int) -> None:
    if depth > MAX_DEPTH:
        return
    for item in items:
        concept = _meaning(item.get("ConceptNameCodeSequence"))
        kind = str(item.get("ValueType") or "")
        value = _value(item, kind)
        if kind == "CONTAINER":
            if concept:
                lines.append(f"{concept.upper()}:")
        elif value:
            lines.append(f"{concept}: {value}" if concept else value)
        _walk(item.get("ContentSequence") or [], lines, depth + 1)


def _value(item: Dataset, kind: str) -> str:
    if kind in ("TEXT", "UIDREF", "PNAME"):
        return str(item.get("TextValue") or item.get("UID") or item.get("PersonName") or "").strip()
    if kind == "CODE":
        return _meaning(item.get("ConceptCodeSequence"))
    if kind == "NUM":
        measured = (item.get("MeasuredValueSequence") or [None])[0]
        if measured is None:
            return ""
        units = _meaning(measured.get("MeasurementUnitsCodeSequence"), field="CodeValue")
        return f"{measured.get('NumericValue', '')} {units}".strip()
    if kind in ("DATE", "DATETIME", "TIME"):
        return str(item.get("Date") or item.get("DateTime") or item.get("Time") or "")
    return ""


def _meaning(sequence: object, field: str = "CodeMeaning") -> str:
    if not sequence:
        return ""
    first = sequence[0]  # type: ignore[index]
    return str(first.get(field) or "").strip()
