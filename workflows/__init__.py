"""The case workflow, its activities, the event bridge and the worker."""
