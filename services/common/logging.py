"""structlog JSON logs. Bind `case_id`, `workflow_id`, `message_id`; never PHI.

An exception is logged as its outline: each exception of the chain by type, each frame by file, line and
function, never its message. Messages quote the values that caused them (SQL parameters and a unique
violation's key, a pydantic `input_value`, a DICOM element), which may be PHI. The same outline replaces the
traceback of every stdlib logger (uvicorn, temporalio, pynetdicom), and libraries that log the data they
handle are quieted: pynetdicom's C-FIND identifiers (a patient's MRN, the study date) and pydicom's warnings,
which quote the invalid value. A signed link's `sig=` is redacted from any line that quotes a URL.
"""

from __future__ import annotations

import logging
import re
import sys
import traceback
import warnings
from collections.abc import MutableMapping
from types import TracebackType
from typing import Any

import structlog

_configured = False

# Libraries whose INFO (or WARNING) lines would quote message contents, or only add noise.
QUIET = {
    "pika": logging.WARNING,
    "httpx": logging.WARNING,
    "uvicorn.access": logging.WARNING,
    "temporalio.activity": logging.WARNING,
    "pynetdicom": logging.WARNING,  # INFO dumps each C-FIND request and response identifier
    "pydicom": logging.ERROR,  # its warnings quote the invalid value ("Invalid value for VR DA: '…'")
}


def exception_outline(exc: BaseException) -> str:
    """The traceback of `exc` and the exceptions it was raised from, without any exception's message."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    lines: list[str] = []
    for position, error in enumerate(reversed(chain)):
        if position:
            lines.append("which led to:")
        kind = type(error)
        lines.append(f"{kind.__module__}.{kind.__qualname__} (message not logged: it may quote values)")
        for frame in traceback.extract_tb(error.__traceback__):
            lines.append(f'  File "{frame.filename}", line {frame.lineno}, in {frame.name}')
    return "\n".join(lines)


def _exception(exc_info: Any) -> BaseException | None:
    if isinstance(exc_info, BaseException):
        return exc_info
    if isinstance(exc_info, tuple):
        return exc_info[1]  # type: ignore[no-any-return]
    return sys.exc_info()[1] if exc_info else None


def outline_exc_info(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor in place of `format_exc_info`: `exception` is the outline, not the traceback."""
    exc = _exception(event_dict.pop("exc_info", None))
    if exc is not None:
        event_dict["exception"] = exception_outline(exc)
    return event_dict


class NoExceptionMessages(logging.Filter):
    """A library that logs an exception as the message itself (pynetdicom's `LOGGER.exception(exc)`) would
    print its text: the record keeps only the exception's type (the traceback is the outline)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, BaseException):
            kind = type(record.msg)
            record.msg, record.args = f"{kind.__module__}.{kind.__qualname__} (message not logged)", ()
        return True


SIGNATURE = re.compile(r"([?&]sig=)[^&\s\"']+")


class NoLinkSignatures(logging.Filter):
    """A signed link's signature is a credential while it lives (services.auth.signed_links): a line that
    quotes a URL (uvicorn's access log, when turned on; an httpx request line) shows `sig=REDACTED`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "sig=" in message:
            record.msg, record.args = SIGNATURE.sub(r"\1REDACTED", message), ()
        return True


class OutlineFormatter(logging.Formatter):
    """A stdlib formatter that writes the outline where the traceback would be."""

    def formatException(
        self, ei: tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]
    ) -> str:
        return exception_outline(ei[1]) if ei[1] is not None else ""


def configure_logging(service: str, level: str = "INFO") -> None:
    global _configured
    if _configured:
        return
    _configured = True
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(OutlineFormatter("%(message)s"))
    handler.addFilter(NoExceptionMessages())
    handler.addFilter(NoLinkSignatures())
    logging.basicConfig(level=level, handlers=[handler])
    for name, quiet in QUIET.items():
        logging.getLogger(name).setLevel(quiet)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            outline_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=structlog.PrintLoggerFactory(),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=service)


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)  # type: ignore[no-any-return]
