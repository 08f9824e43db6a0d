"""Run pytest and exit with its status even if temporalio aborts the interpreter at exit (sdk-python #300)."""

from __future__ import annotations

import os
import sys

import pytest


def main() -> None:
    status = int(pytest.main(sys.argv[1:]))
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
