"""Shared infrastructure for every service: settings, logging, database, AMQP, HTTP app factory.

Exception tree::

    CaseError
      + IntakeRejected           (4xx to the caller, never retried)
      + PoisonMessage            (dead-lettered at once, never retried)
      + RecordsRejected          (4xx to the uploader, nothing stored)
"""
