"""Small, valid DICOM instances for tests and demos (synthetic: the patient is made up)."""

from __future__ import annotations

import io

from scripts.synthetic_study import make_us_instance

__all__ = ["make_pdf_report", "make_us_instance"]


def make_pdf_report(text: str) -> bytes:
    """A one-page PDF whose text layer holds `text`, one line per line (an original report for tests)."""
    from reportlab.lib.pagesizes import letter
    from reportlab.pdfgen.canvas import Canvas

    buffer = io.BytesIO()
    canvas = Canvas(buffer, pagesize=letter)
    y = 720
    for line in text.splitlines():
        canvas.drawString(72, y, line)
        y -= 16
    canvas.save()
    return buffer.getvalue()
