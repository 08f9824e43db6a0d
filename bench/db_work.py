"""What PostgreSQL did for a unit of work (a case, a request): the rows each service's schema inserted,
updated and deleted, read from the server's own statistics (`pg_stat_user_tables`) before and after.

Temporal's counters (bench.server_work) say what the engine did per case; these say what the services
wrote, table by table: an inbox row per message applied, an outbox row per message sent, a timeline row
per status, a webhook delivery and its attempt per partner notification. Rows, not transactions: the
services' idle loops (outbox relays, the webhook sender) commit empty transactions all the time, but they
write no row, so rows settle once the work is done and transactions never do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from bench.system import System

# PostgreSQL sends a backend's counters to the statistics at most once a second; a backend that wrote within
# a second of its last report and then went idle reports after 10 s (PGSTAT_IDLE_INTERVAL). So the counts
# are final once they have not changed for QUIET seconds, read every SETTLE, for at most SETTLE_FOR.
SETTLE = 1.0
QUIET = 11.0
SETTLE_FOR = 40.0
ROWS = (
    "SELECT schemaname, relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
    "WHERE schemaname NOT IN ('pg_catalog', 'information_schema')"
)

Counts = tuple[float, float, float]  # inserted, updated, deleted


def difference(before: Mapping[str, Counts], after: Mapping[str, Counts]) -> dict[str, Counts]:
    """Per table (`schema.table`), what changed between two reads; tables that changed nothing left out."""
    changed: dict[str, Counts] = {}
    for table, now in after.items():
        then = before.get(table, (0, 0, 0))
        delta = (now[0] - then[0], now[1] - then[1], now[2] - then[2])
        if any(delta):
            changed[table] = delta
    return changed


def by_schema(tables: Mapping[str, Counts]) -> dict[str, Counts]:
    """The tables' counts summed per schema (a service's own tables)."""
    schemas: dict[str, Counts] = {}
    for table, (ins, upd, dele) in tables.items():
        schema = table.split(".", 1)[0]
        i, u, d = schemas.get(schema, (0, 0, 0))
        schemas[schema] = (i + ins, u + upd, d + dele)
    return schemas


def _written(counts: Counts) -> float:
    return sum(counts)


def describe(tables: Mapping[str, Counts], top: int = 4) -> str:
    """`intake 38/35/0, review 9/7/0; most: intake.webhook_deliveries 11/22/0, …` (inserted/updated/deleted),
    busiest schema and table first."""
    if not tables:
        return "no rows written"
    schemas = sorted(by_schema(tables).items(), key=lambda item: (-_written(item[1]), item[0]))
    busiest = sorted(tables.items(), key=lambda item: (-_written(item[1]), item[0]))[:top]

    def fmt(counts: Counts) -> str:
        return "/".join(f"{c:g}" for c in counts)

    return (
        ", ".join(f"{name} {fmt(counts)}" for name, counts in schemas)
        + "; most: "
        + ", ".join(f"{name} {fmt(counts)}" for name, counts in busiest)
    )


@dataclass
class DbWork:
    """The rows written between `begin` and `end`, per unit of work. Both wait for the statistics to settle
    (QUIET seconds at least), so neither belongs inside a timed block."""

    system: System
    used: dict[str, Counts] = field(default_factory=dict)

    def _read(self) -> dict[str, Counts]:
        with psycopg.connect(self.system.settings.database_url or "", autocommit=True) as conn:
            # Each read in a transaction of its own: PostgreSQL keeps the statistics a transaction read
            # until it ends (stats_fetch_consistency = cache).
            return {f"{s}.{t}": (ins, upd, dele) for s, t, ins, upd, dele in conn.execute(ROWS)}

    def _settled(self) -> dict[str, Counts]:
        current = self._read()
        started = since = time.monotonic()
        while time.monotonic() - since < QUIET and time.monotonic() - started < SETTLE_FOR:
            time.sleep(SETTLE)
            previous, current = current, self._read()
            if current != previous:
                since = time.monotonic()
        return current

    async def begin(self) -> DbWork:
        self._before = await asyncio.to_thread(self._settled)
        return self

    async def end(self) -> None:
        self.used = difference(self._before, await asyncio.to_thread(self._settled))

    def per_unit(self, units: int) -> dict[str, Counts]:
        n = max(units, 1)
        return {
            table: (round(i / n, 1), round(u / n, 1), round(d / n, 1))
            for table, (i, u, d) in self.used.items()
        }
