"""What the Temporal server itself did for a unit of work (a case, a bare workflow), read from its own
Prometheus counters before and after: workflow tasks completed, signals, updates and queries taken in,
history writes (one per transaction on a workflow) and visibility writes (each status a case announces is a
search-attribute upsert, and each workflow task that upserts writes the visibility store once more).

The CPU a process used says where the cores went; these counts say what for, side by side with a ceiling."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.system import System

SETTLE = 1.2  # seconds between the scrapes that must agree

# name shown -> (metric, labels it must carry: one of the values `|` separates)
COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "workflow tasks": ("service_requests", {"service_name": "frontend", "operation": "RespondWorkflowTaskCompleted"}),
    "signals": ("service_requests", {"service_name": "frontend", "operation": "SignalWorkflowExecution"}),
    "updates": ("service_requests", {"service_name": "frontend", "operation": "UpdateWorkflowExecution"}),
    "queries": ("service_requests", {"service_name": "frontend", "operation": "QueryWorkflow"}),
    "polls": (
        "service_requests",
        {"service_name": "frontend", "operation": "PollWorkflowTaskQueue|PollActivityTaskQueue"},
    ),
    "history writes": (
        "persistence_requests",
        {"service_name": "history", "operation": "CreateWorkflowExecution|UpdateWorkflowExecution"},
    ),
    "visibility writes": ("visibility_persistence_requests", {}),
}  # fmt: skip


def read_counters(text: str, namespace: str) -> dict[str, float]:
    """The COUNTERS' totals in one scrape of the server's metrics (samples of other namespaces left out)."""
    totals = dict.fromkeys(COUNTERS, 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("namespace", namespace) != namespace:
                continue
            name = sample.name.removesuffix("_total")
            for shown, (metric, labels) in COUNTERS.items():
                if name == metric and all(sample.labels.get(k) in v.split("|") for k, v in labels.items()):
                    totals[shown] += sample.value
    return totals


@dataclass
class ServerWork:
    """The counters' increase between `begin` and `end`, per unit of work. Both wait for the counters to
    settle, so neither belongs inside a timed block."""

    system: System
    used: dict[str, float] = field(default_factory=dict)

    async def _scrape(self, http: httpx.AsyncClient) -> dict[str, float]:
        response = await http.get(f"http://127.0.0.1:{self.system.settings.temporal_metrics_port}/metrics")
        response.raise_for_status()
        return read_counters(response.text, self.system.settings.temporal_namespace)

    async def _settled(self) -> dict[str, float]:
        """The counters once two scrapes SETTLE seconds apart agree (for at most a minute). The server
        reports its counters every second, so work just done may not show yet; and the work a measurement
        set off (the first steps of the cases an intake run created) is counted with it and done before
        the next measurement, the ceiling, begins on a server that is otherwise idle."""
        async with httpx.AsyncClient(timeout=10) as http:
            current = await self._scrape(http)
            for _ in range(int(60 / SETTLE)):
                await asyncio.sleep(SETTLE)
                previous, current = current, await self._scrape(http)
                if current == previous:
                    break
        return current

    async def begin(self) -> ServerWork:
        self._before = await self._settled()
        return self

    async def end(self) -> None:
        after = await self._settled()
        self.used = {name: after[name] - self._before[name] for name in after}

    def per_unit(self, units: int) -> dict[str, float]:
        return {name: round(count / max(units, 1), 1) for name, count in self.used.items()}

    @staticmethod
    def side_by_side(*per_unit: dict[str, float]) -> str:
        """`workflow tasks 10.9 | 4.1 | 10.2, …`: each counter for every measurement given, in order."""
        return ", ".join(f"{name} {' | '.join(f'{p[name]:g}' for p in per_unit)}" for name in COUNTERS)
