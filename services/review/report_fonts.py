"""The fonts the report is drawn in, and text turned into Paragraph markup they can draw.

reportlab's standard fonts (Helvetica) draw only Latin-1: a patient named Łukasiewicz, an original report in
Chinese, "β-hCG ≥ 5" came out as black boxes. The report is drawn in DejaVu Sans (2.37, shipped in `fonts/` with
its licence, so every deployment draws and refuses the same characters: Latin, Greek, Cyrillic, Hebrew, Arabic,
combining marks, symbols), with reportlab's built-in CID fonts for
Chinese, Japanese and Korean. Text is NFC-normalized (`e` + U+0301 is `é`), invisible format characters
(zero-width spaces, bidi controls; not the zero-width joiners) are left out, and a character no font draws
is written as `[U+1F642]` so the reader sees that something was there. Specialists are refused such characters up front (`unprintable`).

Hebrew and Arabic are joined and put in visual order (report_bidi.py) line by line: `markup` does it for a
short value, report_paragraphs.py for a paragraph, which must be broken into lines first."""

from __future__ import annotations

import unicodedata
from functools import cache
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib.fonts import addMapping
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfbase.ttfonts import TTFont

from services.review.report_bidi import arabic_joined, letter_of_form, right_to_left, visual

FONT_DIR = Path(__file__).parent / "fonts"
BODY, BOLD = "DejaVuSans", "DejaVuSans-Bold"
# Not embedded (PDF viewers bring their own CJK fonts); each covers its script's characters.
KOREAN, JAPANESE, CHINESE = "HYSMyeongJo-Medium", "HeiseiMin-W3", "STSong-Light"

JOINERS = "\u200c\u200d"  # ZWNJ, ZWJ: how Persian (Arabic) letters join; the font draws them as nothing


@cache
def register() -> None:
    """Register the report's fonts with reportlab (once per process)."""
    for name, file in ((BODY, "DejaVuSans.ttf"), (BOLD, "DejaVuSans-Bold.ttf")):
        pdfmetrics.registerFont(TTFont(name, str(FONT_DIR / file)))
    for bold in (0, 1):
        for italic in (0, 1):
            addMapping(BODY, bold, italic, BOLD if bold else BODY)
    for cid in (KOREAN, JAPANESE, CHINESE):
        pdfmetrics.registerFont(UnicodeCIDFont(cid))
        for bold in (0, 1):  # no bold face: a CJK run in bold text is drawn regular
            for italic in (0, 1):
                addMapping(cid, bold, italic, cid)


@cache
def _body_glyphs() -> frozenset[int]:
    register()
    font = pdfmetrics.getFont(BODY)
    return frozenset(font.face.charToGlyph)  # type: ignore[attr-defined]


def _cjk_font(char: str) -> str | None:
    code = ord(char)
    if 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F or 0xAC00 <= code <= 0xD7AF:
        return KOREAN
    if 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF or 0xFF65 <= code <= 0xFF9F:
        return JAPANESE
    if (
        0x2E80 <= code <= 0x2FDF
        or 0x3000 <= code <= 0x303F
        or 0x3400 <= code <= 0x4DBF
        or 0x4E00 <= code <= 0x9FFF
        or 0xF900 <= code <= 0xFAFF
        or 0xFF00 <= code <= 0xFF64
    ):
        return CHINESE
    return None


def font_for(char: str) -> str | None:
    """BODY, a CJK font, or None: no font of the report draws it."""
    # Beyond the BMP (DejaVu's few emoji) reportlab writes a ToUnicode entry PDF readers cannot parse, and the
    # whole line is lost to text extraction and search: those are not drawn.
    code = ord(char)
    if char in "\n\t" or (code <= 0xFFFF and code in _body_glyphs() and unicodedata.category(char) != "Cc"):
        return BODY
    return _cjk_font(char)


def _printed(text: str) -> str:
    """The text as the report prints it: NFC, without invisible format characters but the zero-width
    (non-)joiners, which say how Persian (Arabic) letters join, and which the font draws as nothing."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "".join(c for c in text if unicodedata.category(c) != "Cf" or c in JOINERS)


def unprintable(text: str) -> list[str]:
    """The characters of `text` no font of the report draws (emoji, control characters), each once."""
    return list(dict.fromkeys(c for c in _printed(text) if font_for(c) is None))


def describe_characters(chars: list[str]) -> str:
    """`🙂 (U+1F642 SLIGHTLY SMILING FACE)`, for an error message."""
    named = (f"U+{ord(c):04X} {_name(c)}" for c in chars[:5])
    return ", ".join(named) + (f" and {len(chars) - 5} more" if len(chars) > 5 else "")


def shown(text: str) -> str:
    """The text as the report shows it: NFC, without invisible format characters, `[U+XXXX]` for a character
    no font draws."""
    return "".join(c if font_for(c) is not None else f"[U+{ord(c):04X}]" for c in _printed(text))


def _name(char: str) -> str:
    if unicodedata.category(char) == "Cc":
        return "a control character"
    return unicodedata.name(char, "a private-use or unassigned character")


def joined(text: str) -> str:
    """Arabic letters in the form they take beside their neighbours (`arabic_joined`); a form the font
    lacks is drawn as its letter (only letters DejaVu Sans lacks altogether have such)."""
    if not right_to_left(text):
        return text
    glyphs = _body_glyphs()
    return "".join(c if ord(c) in glyphs else letter_of_form(c) for c in arabic_joined(text))


def markup(text: str) -> str:
    """Paragraph markup that draws `text` as shown (`shown`): escaped (`<b>` is text, not bold), each run in
    a font that has its characters, each line in visual order (`visual`: right for a value on one line; a
    paragraph that may be broken into lines is report_paragraphs.paragraph). Newlines stay newlines."""
    lines = shown(text).split("\n")
    return "\n".join(markup_drawn(visual(joined(line))) for line in lines)


def markup_drawn(text: str) -> str:
    """Paragraph markup for text already as it is drawn (shown, joined, in visual order)."""
    register()
    parts: list[str] = []
    run, run_font = "", BODY
    for char in text:
        font = font_for(char) or BODY
        if font != run_font and run:
            parts.append(_run(run, run_font))
            run = ""
        run, run_font = run + char, font
    if run:
        parts.append(_run(run, run_font))
    return "".join(parts)


def _run(text: str, font: str) -> str:
    escaped = escape(text).replace("\t", " ")
    return escaped if font == BODY else f'<font name="{font}">{escaped}</font>'
