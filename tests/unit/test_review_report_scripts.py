"""Right-to-left text on the report as a reader sees it: the characters drawn on each line, left to right.

pypdf's `extract_text` turns right-to-left runs back into reading order by its own guess, so it cannot tell a
PDF drawn in visual order from one drawn backwards: these tests read what each line draws from the content
stream, through each font's ToUnicode map."""

from __future__ import annotations

import dataclasses
import io
import re

from pypdf import PdfReader
from pypdf.generic import ContentStream, DictionaryObject

from services.review.report_pdf import ReportContent, render_report_pdf
from tests.unit.test_review_report import content


def drawn_lines(pdf: bytes) -> list[str]:
    """Each line of text the PDF draws, its characters in the order they are drawn (left to right)."""
    lines, line = [], ""
    for page in PdfReader(io.BytesIO(pdf)).pages:
        fonts = {name: _to_unicode(ref.get_object()) for name, ref in page["/Resources"]["/Font"].items()}
        table: dict[int, str] | None = None
        for operands, operator in ContentStream(page.get_contents(), page.pdf).operations:
            if operator == b"Tf":
                table = fonts[operands[0]]
            elif operator == b"Tj":
                raw = operands[0].original_bytes
                line += "".join(table[b] for b in raw) if table is not None else raw.decode("latin-1")
            elif operator in (b"ET", b"T*", b"Tm") or (operator in (b"Td", b"TD") and float(operands[1])):
                if line.strip():
                    lines.append(line)
                line = ""
    return lines


def _to_unicode(font: DictionaryObject) -> dict[int, str] | None:
    if "/ToUnicode" not in font:
        return None  # a standard font (the list bullets): its codes are Latin-1
    cmap = font["/ToUnicode"].get_object().get_data().decode("latin-1")
    pairs = re.findall(
        r"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]+)>", "".join(re.findall(r"beginbfchar(.*?)endbfchar", cmap, re.S))
    )
    return {int(code, 16): bytes.fromhex(text).decode("utf-16-be") for code, text in pairs}


def written(**findings: object) -> ReportContent:
    c = content()
    return dataclasses.replace(c, findings=c.findings.model_copy(update=findings))


def test_hebrew_with_a_measurement_and_an_english_term_is_drawn_in_visual_order() -> None:
    """reportlab draws what it is given left to right: Hebrew came out mirrored, the measurement and the
    English term in the wrong places (the line read "ציסטה של 12 mm..." from the left)."""
    hebrew = "ציסטה של 12 mm, ללא זרימה (Doppler)."

    lines = drawn_lines(render_report_pdf(written(findings=hebrew, alternative_diagnoses=["אנדומטריומה"])))

    # Read from the right: ציסטה של 12 mm, ללא זרימה (Doppler). The number and the English words keep their
    # left-to-right order, the brackets face the way they do in the Hebrew sentence.
    assert ".(Doppler) המירז אלל ,mm 12 לש הטסיצ" in lines
    assert "המוירטמודנא" in lines
    assert not any("ציסטה" in line for line in lines)


def test_arabic_is_drawn_joined_and_in_visual_order() -> None:
    """Arabic letters came out in their isolated forms, unjoined, and backwards."""
    arabic = "كيس بسيط قطره 12 مم، لا يوجد تدفق"  # simple cyst, 12 mm across, no flow

    lines = drawn_lines(render_report_pdf(written(impression=arabic)))

    # Left to right as drawn, the words in the order read from the right, each letter in the form it takes in
    # its word (presentation forms) and lam-alef as its ligature: تدفق يوجد لا ،مم 12 قطره بسيط كيس
    expected = " ".join(
        [
            "\ufed6\ufed3\ufeaa\ufe97",  # تدفق: qaf final, feh initial, dal final, teh initial
            "\ufeaa\ufe9f\ufeee\ufef3",  # يوجد: dal final, jeem initial, waw final, yeh initial
            "\ufefb",  # لا: the lam-alef ligature
            "\u060c\ufee2\ufee3",  # مم،: the comma, meem final, meem initial
            "12",
            "\ufee9\ufeae\ufec4\ufed7",  # قطره: heh isolated, reh final, tah medial, qaf initial
            "\ufec2\ufef4\ufeb4\ufe91",  # بسيط: tah final, yeh medial, seen medial, beh initial
            "\ufeb2\ufef4\ufedb",  # كيس: seen final, yeh medial, kaf initial
        ]
    )
    assert expected in lines, [line for line in lines if "12" in line]
    assert not any(re.search("[\u0621-\u064a]", line) for line in lines)  # no letter drawn unjoined


def test_a_right_to_left_paragraph_longer_than_a_line_starts_on_the_right_of_its_first_line() -> None:
    """Broken into lines left to right and only then reversed, a Hebrew paragraph read from its last line up."""
    words = [letter * 3 for letter in "אבגדהוזחטיכלמנסעפצקרשת"]  # 22 words, about two lines of the column

    lines = drawn_lines(render_report_pdf(written(findings=" ".join(words))))

    drawn = [line.split(" ") for line in lines if "אאא" in line or "תתת" in line]
    first, last = drawn[0], drawn[-1]
    assert len(drawn) == 2 and first[-1] == "אאא" and last[0] == "תתת"
    assert [*reversed(first), *reversed(last)] == words  # every word once, in reading order


def test_a_zero_width_non_joiner_keeps_persian_letters_apart() -> None:
    """Persian writes "millimetre" میلی‌متر with a zero-width non-joiner: it was dropped with the other invisible
    characters, and the two halves were drawn joined into another word."""
    lines = drawn_lines(render_report_pdf(written(findings="۱۲ میلی\u200cمتر")))

    # Left to right: reh final, teh medial, meem initial | yeh final, lam medial, yeh medial, meem initial, 12
    assert "\ufeae\ufe98\ufee3\u200c\ufbfd\ufee0\ufbff\ufee3 ۱۲" in lines, [
        line for line in lines if "۱۲" in line
    ]
