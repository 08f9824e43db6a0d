"""Free text on the report as paragraphs, right-to-left text broken into lines before it is reordered.

A right-to-left paragraph must be broken into lines in reading order, and each line then put into visual
order: its first words go on the right of its first line. reportlab breaks the lines of what it is given
left to right, so a paragraph with Hebrew or Arabic in it is broken here, at the width it is laid out at,
each line reordered (report_bidi.visual) and drawn as its own line, right-aligned when the paragraph reads
right to left. Text without right-to-left letters is a plain Paragraph, as before.
"""

from __future__ import annotations

from collections.abc import Callable

from reportlab.lib.enums import TA_RIGHT
from reportlab.lib.styles import ParagraphStyle
from reportlab.platypus import Flowable, Paragraph

from services.review.report_bidi import base_right_to_left, right_to_left, visual
from services.review.report_fonts import drawn_width, joined, markup, markup_drawn, needs_naskh, shown


def paragraph(lines: list[str], style: ParagraphStyle) -> Flowable:
    """The lines (logical order, as written) as one paragraph that keeps them as lines."""
    if not any(map(right_to_left, lines)):
        return Paragraph("<br/>".join(map(markup, lines)), style)
    return RightToLeftParagraph(lines, style)


def reads_right_to_left(lines: list[str]) -> bool:
    """Whether a paragraph reads right to left: its first line with text does (right-aligned, bullet right)."""
    return next((base_right_to_left(line) for line in lines if line.strip()), False)


class RightToLeftParagraph(Flowable):
    """Lines with right-to-left text, broken at the width the paragraph is given, each drawn in visual order."""

    def __init__(self, lines: list[str], style: ParagraphStyle) -> None:
        super().__init__()
        self.lines = [joined(shown(line)) for line in lines]
        self.naskh = [needs_naskh(line) for line in self.lines]  # a line broken in two is drawn in one design
        self.style = style
        self._laid_out: tuple[float, Paragraph] | None = None

    def _paragraph(self, width: float) -> Paragraph:
        if self._laid_out is None or self._laid_out[0] != width:
            style = self.style
            room = width - style.leftIndent - style.rightIndent
            drawn = [
                markup_drawn(visual_line, naskh=naskh)
                for line, naskh in zip(self.lines, self.naskh, strict=True)
                for visual_line in _visual_lines(line, room, style.fontName, style.fontSize, naskh)
            ]
            if reads_right_to_left(self.lines):
                style = ParagraphStyle(f"{style.name}RightToLeft", parent=style, alignment=TA_RIGHT)
            self._laid_out = width, Paragraph("<br/>".join(drawn), style)
        return self._laid_out[1]

    def wrap(self, availWidth: float, availHeight: float) -> tuple[float, float]:  # noqa: N803
        self.width, self.height = self._paragraph(availWidth).wrap(availWidth, availHeight)
        return self.width, self.height

    def split(self, availWidth: float, availHeight: float) -> list[Flowable]:  # noqa: N803
        parts: list[Flowable] = self._paragraph(availWidth).split(availWidth, availHeight)
        return parts

    def draw(self) -> None:
        assert self._laid_out is not None, "drawn before it was laid out"
        self._laid_out[1].drawOn(self.canv, 0, 0)

    def getSpaceBefore(self) -> float:  # noqa: N802
        return float(self.style.spaceBefore)

    def getSpaceAfter(self) -> float:  # noqa: N802
        return float(self.style.spaceAfter)


def _visual_lines(line: str, room: float, font: str, size: float, naskh: bool) -> list[str]:
    """The line broken at spaces into lines of at most `room` points (a longer word is cut), each in visual
    order in the direction of the whole line."""
    rtl = base_right_to_left(line)
    return [visual(broken, rtl=rtl) for broken in _broken(line, room, font, size, naskh)]


def _broken(line: str, room: float, font: str, size: float, naskh: bool) -> list[str]:
    def _width(text: str) -> float:
        return drawn_width(text, font, size, naskh=naskh)

    space = _width(" ")
    lines: list[str] = []
    current, current_width = "", 0.0
    for word in line.split(" "):
        width = _width(word)
        if current and current_width + space + width > room:
            lines.append(current)
            current, current_width = "", 0.0
        if current:
            current, current_width = f"{current} {word}", current_width + space + width
            continue
        while width > room and len(word) > 1:
            cut = _fitting(word, room, _width)
            lines.append(word[:cut])
            word = word[cut:]
            width = _width(word)
        current, current_width = word, width
    lines.append(current)
    return lines


def _fitting(word: str, room: float, width: Callable[[str], float]) -> int:
    """How many characters of `word` fit in `room` (at least one)."""
    for cut in range(1, len(word)):
        if width(word[: cut + 1]) > room:
            return cut
    return len(word)
