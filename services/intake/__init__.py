"""Intake: the case API for hospital integration teams; starts the case workflow."""
