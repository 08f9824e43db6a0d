"""The integrated second-opinion report as PDF: the original report and the second opinion side by side."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import zip_longest

from reportlab.lib import colors
from reportlab.lib.pagesizes import A4
from reportlab.lib.styles import ParagraphStyle, getSampleStyleSheet
from reportlab.lib.units import mm
from reportlab.pdfgen.canvas import Canvas
from reportlab.platypus import (
    Flowable,
    ListFlowable,
    ListItem,
    Paragraph,
    SimpleDocTemplate,
    Spacer,
    Table,
    TableStyle,
)
from reportlab.platypus.doctemplate import BaseDocTemplate

from contracts.commands import MatchSpecialist
from contracts.models import DocumentedCommunication
from services.review.models import ReviewFindings, RiskAssessment, Specialist
from services.review.recommendations import describe
from services.review.report_fonts import BODY, BOLD, markup, register, shown
from services.review.report_paragraphs import paragraph, reads_right_to_left

TITLE = "Second-opinion report — diagnostic ultrasound"

AGREEMENT_LABELS = {
    "concordant": "Concordant with the original report",
    "minor_discrepancy": "Minor discrepancy with the original report",
    "major_discrepancy": "Major discrepancy with the original report",
}
QUALITY_LABELS = {"diagnostic": "Diagnostic", "limited": "Limited", "non_diagnostic": "Non-diagnostic"}
# (text colour, background) per agreement: a discrepancy must not be missed by the referring physician.
AGREEMENT_COLOURS = {
    "concordant": (colors.HexColor("#1b5e20"), colors.HexColor("#e8f5e9")),
    "minor_discrepancy": (colors.HexColor("#8a4b00"), colors.HexColor("#fff3e0")),
    "major_discrepancy": (colors.HexColor("#b71c1c"), colors.HexColor("#ffebee")),
}


# What a communicated result is called on the report when it is not marked critical, and how it was told.
AGREEMENT_FINDINGS = {"major_discrepancy": "Major discrepancy", "minor_discrepancy": "Minor discrepancy"}
COMMUNICATION_METHODS = {"telephone": "by telephone", "in_person": "in person"}


# A Paragraph is laid out again at every page it is split over: text is drawn in pieces of at most this many
# lines and about this many characters, so a report of 10,000 short lines, or an original report of 100,000
# characters, is composed in seconds, not minutes.
LINES_PER_PIECE = 8
PIECE_CHARS = 600
MARGIN = 18 * mm
# The side-by-side table: the width its cells wrap text to (half the frame, less the cells' padding), and the
# height of text put in one row.
COLUMN_WIDTH = (A4[0] - 2 * MARGIN) / 2 - 12
ROW_HEIGHT = 120


def _utc(at: datetime) -> str:
    return f"{at.astimezone(UTC):%Y-%m-%d %H:%M} UTC"


ADDENDUM_KIND_LABELS = {
    "correction": "Correction",
    "additional_finding": "Additional finding",
    "late_comparison": "Comparison with prior imaging received after signing",
    "other": "Addendum",
}


@dataclass(frozen=True)
class Addendum:
    """What the specialist signed after the report was issued: the answer to a follow-up question, or an
    addendum of their own (`question` None, `kind` one of ADDENDUM_KIND_LABELS)."""

    text: str
    signed_at: datetime
    question: str | None = None
    kind: str = "other"


@dataclass(frozen=True)
class Signature:
    """The signature block: name, credentials and NPI as they were when the reviewer signed."""

    name: str
    credentials: str
    npi: str | None = None

    def __str__(self) -> str:
        return f"{self.name}, {self.credentials}"


@dataclass(frozen=True)
class ReportContent:
    """What the integrated report says, gathered from the review request, the findings and the reviewer."""

    case_id: str
    request: MatchSpecialist
    findings: ReviewFindings
    reviewer: Specialist
    subspecialty: str
    signed_at: datetime
    addenda: tuple[Addendum, ...] = ()
    # Copied onto the review at submission; None for reviews signed before that: the directory's entry.
    signature: Signature | None = None
    # Who was told of a critical result or major discrepancy the review did not document, as operations did.
    communication: DocumentedCommunication | None = None

    @property
    def patient_name(self) -> str:
        return f"{self.request.patient.given_name} {self.request.patient.family_name}"

    @property
    def signer(self) -> Signature:
        if self.signature is not None:
            return self.signature
        return Signature(self.reviewer.display_name, self.reviewer.credentials, self.reviewer.npi or None)

    @property
    def communication_statement(self) -> tuple[str, str] | None:
        """Who was told of the result, how and when, as (what, the rest of the sentence): the specialist's own
        documentation, else what operations documented on the case. The PDF and the DiagnosticReport say it."""
        f = self.findings
        what = "Critical result" if f.critical_result else AGREEMENT_FINDINGS.get(f.agreement, "Finding")
        if f.communication is not None:
            told = f.communication
            return what, (
                f"communicated {COMMUNICATION_METHODS[told.method]} to {told.recipient} at {_utc(told.at)} by "
                f"{self.reviewer_signature}{' (read back)' if told.read_back else ''}."
            )
        if self.communication is not None:
            documented = self.communication
            return what, (
                f"communicated {COMMUNICATION_METHODS[documented.method]} to {documented.recipient} "
                f"({documented.recipient_role}) at {_utc(documented.at)}"
                f"{' (read back)' if documented.read_back else ''}; documented by {documented.documented_by} "
                f"at {_utc(documented.documented_at)}."
            )
        return None

    @property
    def recommendations(self) -> list[str]:
        """One line each, structured follow-ups in a fixed form (the PDF and the DiagnosticReport say the same)."""
        lines = [describe(item) for item in self.findings.recommendations]
        if self.findings.new_ultrasound_needed:
            lines.append("A new ultrasound examination is needed.")
        return lines

    @property
    def reviewer_signature(self) -> str:
        return str(self.signer)


def render_report_pdf(content: ReportContent) -> bytes:
    """The PDF bytes; the same content always gives the same bytes, so the file is content-addressed."""
    buffer = io.BytesIO()
    doc = SimpleDocTemplate(
        buffer,
        pagesize=A4,
        leftMargin=MARGIN,
        rightMargin=MARGIN,
        topMargin=16 * mm,
        bottomMargin=18 * mm,
        title=TITLE,
        author=content.reviewer_signature,
        invariant=1,
    )
    footer = f"Case {content.case_id} · version {1 + len(content.addenda)}"
    if content.addenda:
        footer += f" · {len(content.addenda)} addendum(s) at the end"

    def on_page(canvas: Canvas, document: BaseDocTemplate) -> None:
        canvas.setFont(BODY, 8)
        canvas.drawString(18 * mm, 10 * mm, footer)
        canvas.drawRightString(A4[0] - 18 * mm, 10 * mm, f"Page {document.page}")

    doc.build(_story(content), onFirstPage=on_page, onLaterPages=on_page)
    return buffer.getvalue()


def _story(c: ReportContent) -> list[Flowable]:
    styles = _styles()
    r, f = c.request, c.findings
    patient = r.patient
    story: list[Flowable] = [Paragraph(markup(TITLE), styles["Title"])]
    if c.addenda:
        last = c.addenda[-1].signed_at.astimezone(UTC)
        story.append(
            Paragraph(
                f"<b>Addended</b>: {len(c.addenda)} addendum(s), the latest {last:%Y-%m-%d %H:%M} UTC; see the end.",
                _critical_style(styles),
            )
        )
    story.append(
        _facts(
            [
                ("Patient", c.patient_name),
                ("Birth date", patient.birth_date.isoformat()),
                ("MRN", patient.mrn),
                ("Sex", patient.sex.value),
                (
                    "Referring physician",
                    f"{r.referring.name} (NPI {r.referring.npi}), {r.referring.organization}",
                ),
                (
                    "Exam",
                    f"{r.exam.exam_type} ultrasound, {r.exam.performed_on.isoformat()}, {r.exam.facility}"
                    + (f", accession {r.exam.accession_number}" if r.exam.accession_number else ""),
                ),
                (
                    "Images reviewed",
                    f"{r.study.instance_count} images ({r.study.multiframe_count} cine clips) in "
                    f"{r.study.series_count} series, study {r.study.study_instance_uid}",
                ),
                *([("Adequacy warnings", "; ".join(r.adequacy_warnings))] if r.adequacy_warnings else []),
                ("Clinical question", r.clinical_question),
                ("Reason for second opinion", r.reason.replace("_", " ")),
                *(
                    [("Gestational age", f"{r.gestational_age_weeks} weeks")]
                    if r.gestational_age_weeks
                    else []
                ),
                *(
                    [("Planned procedure", r.procedure_scheduled_on.isoformat())]
                    if r.procedure_scheduled_on
                    else []
                ),
            ],
            styles,
        )
    )
    story += [Spacer(1, 4 * mm), _agreement_line(f.agreement, styles), Spacer(1, 4 * mm)]
    statement = c.communication_statement
    if statement is not None:
        what, rest = statement
        story += [
            Paragraph(f"<b>{markup(what)}</b> {markup(rest)}", _critical_style(styles)),
            Spacer(1, 4 * mm),
        ]
    story.append(_side_by_side(r.original_report.text, f, styles))
    if f.assessments:
        story += _section("Assessment", [_assessment(a) for a in f.assessments], styles)
    if f.alternative_diagnoses:
        story += _section("Alternative diagnoses", f.alternative_diagnoses, styles)
    else:
        story += _section("Alternative diagnoses", ["None given."], styles, bullets=False)
    story += _section("Recommendations", c.recommendations, styles)
    quality = QUALITY_LABELS[f.technical_quality]
    if f.technical_notes:
        quality += f": {f.technical_notes}"
    story += _section("Technical quality of the original study", [quality], styles, bullets=False)
    if f.patient_answers:
        story += _section("Answers to the patient's questions", [f.patient_answers], styles, bullets=False)
    subspecialty = c.subspecialty.replace("_", " ")
    npi = f" (NPI {markup(c.signer.npi)})" if c.signer.npi else ""
    story += [
        Spacer(1, 6 * mm),
        Paragraph(
            f"<b>Reviewer:</b> {markup(c.reviewer_signature)} — {markup(subspecialty)}, "
            f"{markup(c.reviewer.organization)}{npi}",
            styles["BodyText"],
        ),
        Paragraph(
            f"Electronically signed {c.signed_at.strftime('%Y-%m-%d %H:%M:%S')} UTC", styles["BodyText"]
        ),
    ]
    for number, addendum in enumerate(c.addenda, start=1):
        story += _addendum(number, addendum, c.reviewer_signature, styles)
    return story


def _addendum(
    number: int, addendum: Addendum, signature: str, styles: dict[str, ParagraphStyle]
) -> list[Flowable]:
    body = styles["BodyText"]
    if addendum.question is None:
        label = ADDENDUM_KIND_LABELS.get(addendum.kind, "Addendum")
        parts = [
            Paragraph(f"Addendum {number} — by the reviewing specialist", styles["Heading"]),
            Paragraph(
                f"<b>{markup(label)}</b> (added by the specialist, not in answer to a question):", body
            ),
        ]
    else:
        parts = [
            Paragraph(f"Addendum {number} — answer to a follow-up question", styles["Heading"]),
            Paragraph("<b>Question:</b>", body),
            *_paragraphs(addendum.question, body),
            Paragraph("<b>Answer:</b>", body),
        ]
    signed = addendum.signed_at.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return [
        *parts,
        *_paragraphs(addendum.text, body),
        Paragraph(f"Electronically signed {signed} UTC by {markup(signature)}", body),
    ]


LEXICON_LABELS = {
    "o_rads_us_2022": "O-RADS US {} (v2022)",
    "acr_ti_rads": "ACR TI-RADS {}",
    "bi_rads_us": "BI-RADS {} (ultrasound)",
    "li_rads_us_2017": "US LI-RADS {} (v2017)",
}


def _assessment(a: RiskAssessment) -> str:
    text = LEXICON_LABELS[a.system].format(a.category)
    if a.points is not None:
        text += f" ({a.points} points)"
    if a.visualization is not None:
        text += f", visualization score {a.visualization}"
    return f"{a.lesion}: {text}" if a.lesion else text


def _styles() -> dict[str, ParagraphStyle]:
    register()
    sheet = getSampleStyleSheet()
    body = ParagraphStyle("Body", parent=sheet["BodyText"], fontName=BODY, fontSize=9.5, leading=12.5)
    return {
        "Title": ParagraphStyle(
            "ReportTitle", parent=sheet["Title"], fontName=BOLD, fontSize=16, spaceAfter=6 * mm
        ),
        "Heading": ParagraphStyle(
            "Heading", parent=sheet["Heading4"], fontName=BOLD, spaceBefore=4 * mm, spaceAfter=1 * mm
        ),
        "BodyText": body,
        "Label": ParagraphStyle("Label", parent=body, fontName=BOLD),
    }


def _paragraphs(text: str, style: ParagraphStyle) -> list[Flowable]:
    """The blocks (blank-line separated) of `text`, each in pieces (`_pieces`) that keep its line breaks."""
    blocks = [b.strip() for b in shown(text).split("\n\n") if b.strip()]
    continued = ParagraphStyle(f"{style.name}Continued", parent=style, spaceBefore=0)
    paragraphs: list[Flowable] = []
    for block in blocks:
        for i, piece in enumerate(_pieces(block)):
            paragraphs.append(paragraph(piece, style if i == 0 else continued))
    return paragraphs or [Paragraph("—", style)]


def _pieces(block: str) -> Iterator[list[str]]:
    """The block's lines, at most LINES_PER_PIECE and about PIECE_CHARS characters at a time; a longer line is
    cut at a space, and its rest goes on on the next line."""
    piece: list[str] = []
    size = 0
    for line in block.split("\n"):
        while line:
            cut = len(line) if len(line) <= PIECE_CHARS else line.rfind(" ", 0, PIECE_CHARS)
            if cut <= 0:
                cut = PIECE_CHARS
            segment, line = line[:cut], line[cut:].lstrip()
            if piece and (len(piece) == LINES_PER_PIECE or size + len(segment) > PIECE_CHARS):
                yield piece
                piece, size = [], 0
            piece.append(segment)
            size += len(segment)
    if piece:
        yield piece


def _facts(rows: list[tuple[str, str]], styles: dict[str, ParagraphStyle]) -> Table:
    data = [
        [Paragraph(markup(k), styles["Label"]), paragraph([shown(v).replace("\n", " ")], styles["BodyText"])]
        for k, v in rows
    ]
    # splitInRow: a long value (a clinical question of emoji, each printed [U+1F642]) goes on on the next page.
    table = Table(data, colWidths=[45 * mm, None], splitInRow=1)
    table.setStyle(TableStyle([("VALIGN", (0, 0), (-1, -1), "TOP"), ("BOTTOMPADDING", (0, 0), (-1, -1), 2)]))
    return table


def _critical_style(styles: dict[str, ParagraphStyle]) -> ParagraphStyle:
    text, background = AGREEMENT_COLOURS["major_discrepancy"]
    return ParagraphStyle(
        "Critical", parent=styles["Label"], textColor=text, backColor=background, borderPadding=(4, 6, 4, 6)
    )


def _agreement_line(agreement: str, styles: dict[str, ParagraphStyle]) -> Paragraph:
    text_colour, background = AGREEMENT_COLOURS[agreement]
    style = ParagraphStyle(
        "Agreement",
        parent=styles["BodyText"],
        fontName=BODY if agreement == "concordant" else BOLD,
        fontSize=11,
        leading=15,
        textColor=text_colour,
        backColor=background,
        borderPadding=(4, 6, 4, 6),
    )
    return Paragraph(f"Agreement: {markup(AGREEMENT_LABELS[agreement])}", style)


def _side_by_side(original: str, f: ReviewFindings, styles: dict[str, ParagraphStyle]) -> Table:
    body, label = styles["BodyText"], styles["Label"]
    second_opinion = [
        Paragraph("Findings", label),
        *_paragraphs(f.findings, body),
        Spacer(1, 2 * mm),
        Paragraph("Impression", label),
        *_paragraphs(f.impression, body),
    ]
    header = [Paragraph("Original report", label), Paragraph("Second opinion", label)]
    # Rows of about ROW_HEIGHT each side, not one cell each: reportlab lays a split cell out again at every
    # page, and a long report took minutes. A row goes to the next page whole (a piece is at most about
    # 30 lines, less than a page); splitting rows would repeat the header in the middle of the page.
    pairs = zip_longest(_rows(_paragraphs(original, body)), _rows(second_opinion), fillvalue="")
    rows = [list(pair) for pair in pairs]
    table = Table([header, *rows], colWidths=["50%", "50%"], repeatRows=1, splitInRow=0)
    table.setStyle(
        TableStyle(
            [
                ("VALIGN", (0, 0), (-1, -1), "TOP"),
                ("BOX", (0, 0), (-1, -1), 0.5, colors.grey),
                ("LINEBELOW", (0, 0), (-1, 0), 0.5, colors.grey),
                ("LINEAFTER", (0, 0), (0, -1), 0.5, colors.grey),
                ("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#eceff1")),
                # The rows of one side read as one cell: no padding between them.
                ("TOPPADDING", (0, 2), (-1, -1), 0),
                ("BOTTOMPADDING", (0, 1), (-1, -2), 0),
            ]
        )
    )
    return table


def _rows(flowables: list[Flowable]) -> list[list[Flowable]]:
    """The flowables of one side in groups of at most about ROW_HEIGHT, one group per row of the table."""
    groups: list[list[Flowable]] = []
    height = ROW_HEIGHT
    for flowable in flowables:
        _, needed = flowable.wrap(COLUMN_WIDTH, A4[1])
        if height + needed > ROW_HEIGHT:
            groups.append([])
            height = 0
        groups[-1].append(flowable)
        height += needed
    return groups


def _section(
    title: str, items: list[str], styles: dict[str, ParagraphStyle], *, bullets: bool = True
) -> list[Flowable]:
    heading = Paragraph(markup(title), styles["Heading"])
    if not bullets:  # prose (technical notes, answers to the patient): its paragraphs and line breaks kept
        return [heading, *(p for item in items for p in _paragraphs(item, styles["BodyText"]))]
    paragraphs = [_list_item(shown(item).split("\n"), styles["BodyText"]) for item in items]
    return [heading, ListFlowable(paragraphs, bulletType="bullet", leftIndent=4 * mm, bulletFontSize=7)]


def _list_item(lines: list[str], style: ParagraphStyle) -> Flowable:
    """A bulleted item; one that reads right to left has its bullet on the right."""
    item = paragraph(lines, style)
    if not reads_right_to_left(lines):
        return item
    return ListItem(item, bulletDir="rtl", bulletAlign="right", leftIndent=0, rightIndent=4 * mm)
