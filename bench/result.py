"""What a benchmark returns, the table it prints and the verdict line `name ratio=<r> target=<t> ok|SHORT`."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


@dataclass
class Result:
    name: str
    what: str
    ceiling: str
    ratio: float | None  # figure / ceiling (higher is better); None where there is no ceiling
    target: str
    ok: bool
    figures: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def verdict(self) -> str:
        ratio = "-" if self.ratio is None else f"{self.ratio:.2f}"
        return f"{self.name} ratio={ratio} target={self.target} {'ok' if self.ok else 'SHORT'}"


def machine() -> str:
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    return f"{platform.machine()} {os.cpu_count()} cores, {memory:.0f} GiB RAM, Python {platform.python_version()}"


def _cell(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def table(results: list[Result]) -> str:
    lines = ["| benchmark | figures | ratio | target | verdict |", "|---|---|---|---|---|"]
    for r in results:
        figures = ", ".join(f"{k} {_cell(v)}" for k, v in r.figures.items())
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        lines.append(f"| `{r.name}` | {figures} | {ratio} | {r.target} | {'ok' if r.ok else 'SHORT'} |")
    return "\n".join(lines)


def write(results: list[Result], path: Path, *, smoke: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "at": datetime.now(UTC).isoformat(),
        "machine": machine(),
        "smoke": smoke,
        "results": [asdict(r) for r in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")
