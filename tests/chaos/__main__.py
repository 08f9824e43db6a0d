"""`python -m tests.chaos [--cases 50 --faults 30 --minutes 12]`: exit 0 only with nothing lost or duplicated."""

from __future__ import annotations

import argparse
import os
import signal

from tests.chaos.harness import TARGETS, chaos, check_targets
from tests.chaos.report import passed, summary, table


def stop_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # unwinds into the harness's teardown: every process it started is killed


def main() -> None:
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--cases", type=int, default=50)
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--minutes", type=float, default=12, help="time allowed for driving the cases")
    parser.add_argument("--seed", type=int, help="replay the fault plan of a run that printed this seed")
    parser.add_argument(
        "--targets",
        default=",".join(TARGETS),
        help=f"comma-separated processes the faults may hit (default: all of {','.join(TARGETS)})",
    )
    args = parser.parse_args()
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip())
    try:
        check_targets(targets)
    except ValueError as exc:
        parser.error(f"--targets: {exc}")
    run = chaos(
        args.cases,
        args.faults,
        args.minutes,
        echo=lambda line: print(line, flush=True),
        seed=args.seed,
        targets=targets,
    )
    if run.verdict is not None:
        print("\n".join(table(run)))
    print(summary(run), flush=True)
    os._exit(0 if passed(run) else 1)  # temporalio can abort the interpreter at exit (sdk-python #300)


if __name__ == "__main__":
    main()
