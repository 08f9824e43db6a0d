"""The chaos run as a table, and the last line the issue asks for."""

from __future__ import annotations

from collections import Counter

from tests.chaos.harness import Run


def table(run: Run) -> list[str]:
    assert run.verdict is not None
    verdict = run.verdict
    lines = [f"{'case':>4}  {'status':<26} {'workflow':<11} reports studies files coverage intake  errors"]
    for case in run.case_list:
        f = verdict.cases[case.number]
        mark = "DUPLICATED" if f.duplicated else ("ok" if f.complete else "LOST")
        lines.append(
            f"{case.number:>4}  {case.status:<26} {f.workflow:<11} {f.reports:>7} {f.studies:>7} "
            f"{f.dicom_files:>5} {f.coverage:>8} {f.intake_rows:>6} {case.errors:>7}  {mark}"
        )
        lines += [f"      {line}" for line in f.trail]
    hits = Counter(fault.target for fault in run.injected)
    lines.append("faults (kill -9): " + ", ".join(f"{t}={n}" for t, n in sorted(hits.items())))
    lines.append(
        "when: "
        + ", ".join(f"{f.target} at {f.at:.0f}s down {f.down_for:.1f}s" for f in run.injected)
        + "; cases sent at "
        + ", ".join(f"{case.release_at - run.started:.0f}s" for case in run.case_list)
    )
    if run.injected:
        slowest = max(run.injected, key=lambda f: f.ready_after)
        lines.append(f"slowest recovery: {slowest.target} ready {slowest.ready_after:.1f}s after restart")
    lines.append(f"supervisor restarts (processes that died on their own): {run.supervisor_restarts}")
    lines.append(f"workflows still running: {verdict.running_workflows}")
    lines.append(
        f"webhooks: {verdict.webhooks_received} received, "
        f"{sum(f.webhook_duplicates for f in verdict.cases.values())} events under a second webhook id, "
        f"{verdict.webhooks_undelivered} not delivered yet, {verdict.webhooks_unknown} unknown ids"
    )
    for queue in sorted(set(verdict.dlq_expected) | set(verdict.dlq_found)):
        expected, found = verdict.dlq_expected.get(queue, set()), verdict.dlq_found.get(queue, set())
        state = (
            "ok"
            if expected == found
            else f"unexpected={sorted(found - expected)} missing={sorted(expected - found)}"
        )
        lines.append(f"dead letters {queue}.dlq: {len(found)} (expected {len(expected)}) {state}")
    closed = f"{run.closed_after:.0f}s" if run.closed_after is not None else "never"
    lines.append(f"all cases closed after {closed}; driving took {run.elapsed:.0f}s; seed {run.seed}")
    return lines


def summary(run: Run) -> str:
    verdict = run.verdict
    completed = verdict.completed if verdict else 0
    lost = verdict.lost if verdict else run.cases
    duplicated = verdict.duplicated if verdict else 0
    return (
        f"chaos cases={run.cases} faults={len(run.injected)} completed={completed} lost={lost} "
        f"duplicated={duplicated}"
    )


def passed(run: Run) -> bool:
    verdict = run.verdict
    return (
        verdict is not None
        and verdict.lost == 0
        and verdict.duplicated == 0
        and verdict.running_workflows == 0
        and verdict.dlq_ok
    )
