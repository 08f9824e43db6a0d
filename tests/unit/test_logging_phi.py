"""Logs never carry PHI through an exception: a traceback is logged by its outline (types, files, lines),
never its messages, which quote the values that caused them; libraries that log the data they handle
(pynetdicom's identifiers, pydicom's invalid values) are quieted. Run in a fresh interpreter: logging is
configured once per process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from services.common.config import PROJECT_ROOT

SCRIPT = textwrap.dedent(
    """
    import logging

    import pydantic
    import pydicom
    import structlog

    from services.common.logging import configure_logging

    configure_logging("phi-test")
    log = structlog.get_logger("phi-test")


    class Patient(pydantic.BaseModel):
        birth_date: pydantic.PastDate


    def handler():
        try:
            Patient.model_validate({"birth_date": "1984-02-31"})
        except pydantic.ValidationError as exc:
            raise ValueError("MRN-0042 Jane Doe could not be stored") from exc


    try:
        handler()
    except ValueError:
        log.exception("message.failed", case_id="c-1")
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")

    dataset = pydicom.Dataset()
    dataset.PatientBirthDate = "1984.03.02"  # legacy ACR-NEMA form: pydicom warns, quoting it
    logging.getLogger("pynetdicom.dsutils").info("(0010,0020) LO [MRN-0042]  # 1 PatientID")
    try:
        raise ValueError("Unable to decode the dataset of MRN-0042")
    except ValueError as exc:
        logging.getLogger("pynetdicom.events").exception(exc)  # as pynetdicom logs a handler's error
    """
)


def test_an_exception_is_logged_by_its_outline_and_libraries_do_not_log_values() -> None:
    run = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    output = run.stdout + run.stderr
    for phi in ("1984-02-31", "MRN-0042", "Jane Doe", "1984.03.02"):
        assert phi not in output, output

    structured = json.loads(run.stdout.splitlines()[0])
    assert structured["event"] == "message.failed" and structured["case_id"] == "c-1"
    outline = structured["exception"]
    # What an engineer needs to find the fault: each exception's type and where it was raised.
    assert "pydantic_core._pydantic_core.ValidationError (message not logged" in outline
    assert "which led to:\nbuiltins.ValueError (message not logged" in outline
    assert ", in handler" in outline
    # The stdlib logger's traceback (uvicorn's "Exception in ASGI application") is the same outline.
    assert "Exception in ASGI application\nbuiltins.ValueError" not in run.stdout  # chain order: cause first
    assert "Exception in ASGI application\npydantic_core._pydantic_core.ValidationError" in run.stdout
    assert "builtins.ValueError (message not logged)\nbuiltins.ValueError (message not logged" in run.stdout
