"""`python -m bench [--smoke] [names…]`: run the benchmarks, print the table and one verdict line each,
write bench/results/latest.json."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import imports, intake, pipeline, retrieve, scale
from bench.result import Result, machine, table, write
from bench.system import System, running_system

BENCHMARKS: dict[str, Callable[..., Result]] = {
    "pipeline": pipeline.run,
    "intake": intake.run,
    "import": imports.run,
    "retrieve": retrieve.run,
    "scale": scale.run,
}
RESULTS = Path(__file__).parent / "results" / "latest.json"


def failed(name: str, exc: BaseException) -> Result:
    return Result(name, "failed", "-", None, "-", False, notes=[f"{type(exc).__name__}: {exc}"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the benchmarks work")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON results go")
    parser.add_argument("names", nargs="*", metavar="name", help="some of: " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, stop)  # so the stack is stopped and its database dropped
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        parser.error(f"no benchmark named {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    names = args.names or list(BENCHMARKS)
    results: list[Result] = []
    # One stack for the run, `scale` last: the cases the others leave open only add to its 10,000.
    with running_system() as system:
        for name in sorted(names, key=list(BENCHMARKS).index):
            print(f"running {name}{' (smoke)' if args.smoke else ''} ...", file=sys.stderr, flush=True)
            started = time.monotonic()
            try:
                results.append(run_one(name, system, args.smoke))
            except Exception as exc:  # one broken benchmark must not hide the others' figures
                traceback.print_exc()
                results.append(failed(name, exc))
            print(f"{name} took {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    print(f"machine: {machine()}")
    print(table(results))
    for result in results:
        print(f"  {result.name}: {result.what}; ceiling: {result.ceiling}")
        for note in result.notes:
            print(f"  {result.name}: {note}")
    write(results, args.output, smoke=args.smoke)
    for result in results:
        print(result.verdict())
    sys.stdout.flush()
    return 0


def stop(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def run_one(name: str, system: System, smoke: bool) -> Result:
    return BENCHMARKS[name](system, smoke=smoke)


if __name__ == "__main__":
    code = main()
    # temporalio can abort the interpreter at exit (sdk-python #300); exit with our own status.
    os._exit(code)
