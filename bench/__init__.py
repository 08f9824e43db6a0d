"""Benchmarks of the whole system against the engine it runs on (`make bench`, `python -m bench`).

Each benchmark starts the real stack (scripts.stack on free ports, its own PostgreSQL database and
RabbitMQ vhost, DATA_DIR in a tmp dir), measures a figure and its ceiling in the same run, and returns a
`Result` whose ratio is compared with the issue's target.
"""
