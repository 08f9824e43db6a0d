"""Crash tests: `python -m tests.chaos` (make chaos) and a short version in `make test`."""
