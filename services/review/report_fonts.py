"""The fonts the report is drawn in, and text turned into Paragraph markup they can draw.

reportlab's standard fonts (Helvetica) draw only Latin-1: a patient named Łukasiewicz, an original report in
Chinese, "β-hCG ≥ 5" came out as black boxes. The report is drawn in fonts shipped in `fonts/` with their
licences, so every deployment draws and refuses the same characters: DejaVu Sans 2.37 (Latin, Greek, Cyrillic,
Hebrew, Arabic, combining marks, symbols, and its few characters beyond U+FFFF), Noto Sans Devanagari (Hindi,
Marathi, Nepali), Noto Sans Thai, Noto Naskh Arabic (the Urdu and Persian letters and forms DejaVu Sans lacks:
heh goal ہ, yeh barree ے; the Arabic letters of a line with one of them are all drawn in it), and for Chinese,
Japanese and Korean reportlab's built-in CID fonts (not embedded: PDF viewers bring their own CJK fonts) with a
subset of Noto Sans CJK for the ideographs beyond U+FFFF (Extension B on, 𠮷; scripts/cjk_supplement_font.py).
Each run of characters is drawn in the first of them that has its characters; Devanagari, Thai and Noto Naskh
Arabic runs are shaped by HarfBuzz (report_shaping.py: conjuncts, vowel signs before their consonant, letters
joined, marks placed). Text is NFC-normalized
(`e` + U+0301 is `é`), invisible format characters (zero-width spaces, bidi controls; not the zero-width joiners)
are left out, and a character no font draws (most emoji, control characters, unassigned code points) is written
as `[U+1F642]` so the reader sees that something was there. Specialists are refused such characters up front
(`unprintable`). The Noto fonts have no bold face: a run of them in bold text is drawn regular.

Hebrew and Arabic are joined and put in visual order (report_bidi.py) line by line: `markup` does it for a
short value, report_paragraphs.py for a paragraph, which must be broken into lines first."""

from __future__ import annotations

import re
import unicodedata
from functools import cache, lru_cache
from pathlib import Path
from xml.sax.saxutils import escape

from reportlab.lib.fonts import addMapping
from reportlab.pdfbase import pdfmetrics
from reportlab.pdfbase.cidfonts import UnicodeCIDFont
from reportlab.pdfbase.pdfmetrics import stringWidth

from services.review.report_bidi import arabic_joined, letter_of_form, right_to_left, visual
from services.review.report_shaping import ShapedFont, shaped

FONT_DIR = Path(__file__).parent / "fonts"
BODY, BOLD = "DejaVuSans", "DejaVuSans-Bold"
DEVANAGARI, THAI, NASKH = "NotoSansDevanagari", "NotoSansThai", "NotoNaskhArabic"
CJK_SUPPLEMENT = "NotoSansCJKSupplement"
FILES = {
    BODY: "DejaVuSans.ttf",
    BOLD: "DejaVuSans-Bold.ttf",
    DEVANAGARI: "NotoSansDevanagari-Regular.ttf",
    THAI: "NotoSansThai-Regular.ttf",
    NASKH: "NotoNaskhArabic-Regular.ttf",
    CJK_SUPPLEMENT: "NotoSansCJK-Supplement-Regular.ttf",
}
# Runs in these are shaped left to right (report_shaping.shaped); NASKH runs right to left.
SHAPED = (DEVANAGARI, THAI)
# Tried in this order for a character neither its script's font (SCRIPTS) nor DejaVu Sans draws.
FALLBACKS = (NASKH, DEVANAGARI, THAI, CJK_SUPPLEMENT)
# Not embedded (PDF viewers bring their own CJK fonts); each covers its script's characters.
KOREAN, JAPANESE, CHINESE = "HYSMyeongJo-Medium", "HeiseiMin-W3", "STSong-Light"

# ZWNJ, ZWJ: how Persian (Arabic) letters and Devanagari conjuncts join; drawn as nothing.
JOINERS = "\u200c\u200d"
# Devanagari (and its Extended and Vedic blocks), Thai: drawn in their own font even where DejaVu has a character.
SCRIPTS = (
    (re.compile("[\u0900-\u097f\ua8e0-\ua8ff\u1cd0-\u1cff]"), DEVANAGARI),
    (re.compile("[\u0e00-\u0e7f]"), THAI),
)
PRESENTATION_FORMS = re.compile("[\ufb50-\ufdff\ufe70-\ufeff]")
# Bidi classes of Arabic letters, Hebrew letters and marks: a run of them is reversed whole in a right-to-left line.
RTL_CLASSES = ("AL", "R", "NSM")
ARABIC_LETTERS = re.compile("[\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff]+")


@cache
def register() -> None:
    """Register the report's fonts with reportlab (once per process)."""
    for name, file in FILES.items():
        pdfmetrics.registerFont(ShapedFont(name, str(FONT_DIR / file)))
    for bold in (0, 1):
        for italic in (0, 1):
            addMapping(BODY, bold, italic, BOLD if bold else BODY)
            for regular_only in (*SHAPED, NASKH, CJK_SUPPLEMENT):  # no bold face: drawn regular
                addMapping(regular_only, bold, italic, regular_only)
    for cid in (KOREAN, JAPANESE, CHINESE):
        pdfmetrics.registerFont(UnicodeCIDFont(cid))
        for bold in (0, 1):  # no bold face: a CJK run in bold text is drawn regular
            for italic in (0, 1):
                addMapping(cid, bold, italic, cid)


@cache
def _glyphs(font: str) -> frozenset[int]:
    """The characters the font draws (not the private-use ones that stand for shaped glyphs)."""
    register()
    shaped_font = pdfmetrics.getFont(font)
    assert isinstance(shaped_font, ShapedFont)
    return shaped_font.cmap


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


@lru_cache(maxsize=65_536)
def font_for(char: str) -> str | None:
    """The font a character is drawn in, or None: no font of the report draws it (a control character, an
    unassigned code point, a surrogate, most emoji)."""
    if char in "\n\t":
        return BODY
    if unicodedata.category(char) in ("Cc", "Cs", "Cn"):
        return None
    code = ord(char)
    for script, font in SCRIPTS:
        if script.match(char) and code in _glyphs(font):
            return font
    if code in _glyphs(BODY):
        return BODY
    return _cjk_font(char) or next((font for font in FALLBACKS if code in _glyphs(font)), None)


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
    """Arabic letters in the form they take beside their neighbours (`arabic_joined`); a form no font of the
    report has is drawn as its letter."""
    if not right_to_left(text):
        return text
    return "".join(c if font_for(c) is not None else letter_of_form(c) for c in arabic_joined(text))


def markup(text: str) -> str:
    """Paragraph markup that draws `text` as shown (`shown`): escaped (`<b>` is text, not bold), each run in
    a font that has its characters, each line in visual order (`visual`: right for a value on one line; a
    paragraph that may be broken into lines is report_paragraphs.paragraph). Newlines stay newlines."""
    lines = shown(text).split("\n")
    return "\n".join(markup_drawn(visual(joined(line))) for line in lines)


def markup_drawn(text: str, *, naskh: bool | None = None) -> str:
    """Paragraph markup for text already as it is drawn (shown, joined, in visual order); `naskh` says whether
    its Arabic letters are drawn in Noto Naskh Arabic (`needs_naskh` of the line it was broken from), by default
    whether this text needs it."""
    register()
    fonts = _fonts(text, naskh=naskh)
    parts: list[str] = []
    start = 0
    for end in range(1, len(text) + 1):
        if end == len(text) or fonts[end] != fonts[start]:
            parts.append(_run(text[start:end], fonts[start]))
            start = end
    return "".join(parts)


def needs_naskh(line: str) -> bool:
    """Whether the Arabic letters of a line are drawn in Noto Naskh Arabic: one of them only it has (Urdu's ہ,
    ے), and it has them all (one design for the line)."""
    letters = _arabic_letters(line)
    return any(font_for(line[i]) == NASKH for i in letters) and all(
        ord(line[i]) in _glyphs(NASKH) for i in letters
    )


@lru_cache(maxsize=16_384)
def drawn_width(text: str, font: str, size: float, *, naskh: bool) -> float:
    """The width of text as drawn (shown, joined) at `size`, each character in the font that draws it, those of
    DejaVu Sans in `font` (the paragraph's, bold or not); shaped runs as the sum of their characters."""
    register()
    fonts = _fonts(text, naskh=naskh)
    return sum(stringWidth(c, font if f == BODY else f, size) for c, f in zip(text, fonts, strict=True))


def _arabic_letters(text: str) -> list[int]:
    return [
        i
        for word in ARABIC_LETTERS.finditer(text)
        for i in range(word.start(), word.end())
        if unicodedata.bidirectional(text[i]) in RTL_CLASSES
    ]


def _fonts(text: str, *, naskh: bool | None = None) -> list[str]:
    """The font each character is drawn in: its own (`font_for`), but a mark or joiner after a letter of a
    shaped script is shaped with it, and the Arabic letters of a line that `needs_naskh` are all drawn in Noto
    Naskh Arabic, in one design."""
    fonts = [font_for(c) or BODY for c in text]
    for i in range(1, len(text)):
        char, before = text[i], fonts[i - 1]
        if before in SHAPED and (
            char in JOINERS or (unicodedata.category(char) in ("Mn", "Mc") and ord(char) in _glyphs(before))
        ):
            fonts[i] = before
    if needs_naskh(text) if naskh is None else naskh:
        for i in _arabic_letters(text):
            if ord(text[i]) in _glyphs(NASKH):
                fonts[i] = NASKH
    # A space between two words in one shaped font is drawn in it: one run, not three, for reportlab to lay out.
    for i in range(1, len(text) - 1):
        if text[i] == " " and fonts[i - 1] == fonts[i + 1] in (*SHAPED, NASKH):
            fonts[i] = fonts[i - 1]
    return fonts


def _shaped_word(word: str, font: str) -> str:
    """Markup drawing a word shaped; a mark HarfBuzz moves up or down (a Thai tone mark) is drawn risen."""
    if not word:
        return ""
    pieces = shaped(word, font) if font != NASKH else shaped(_logical(word), font, rtl=True)
    return "".join(_risen(escape(chars), rise) for chars, rise in pieces)


def _logical(drawn: str) -> str:
    """A right-to-left run, as drawn (visual order, letters in their joined forms), as written: reversed, each
    presentation form its letter (lam-alef its two), for HarfBuzz to join and place with the font's own rules."""
    return "".join(
        unicodedata.normalize("NFKC", c) if PRESENTATION_FORMS.match(c) else c for c in reversed(drawn)
    )


def _risen(drawn: str, rise: int) -> str:
    """Markup drawn `rise` thousandths of the font size above the baseline (below if negative)."""
    if not rise:
        return drawn
    tag = "sup" if rise > 0 else "sub"  # reportlab reads a signed rise as relative to the one around it
    return f'<{tag} rise="{abs(rise) / 10:g}%" size="100%">{drawn}</{tag}>'


def _run(text: str, font: str) -> str:
    if font in SHAPED or font == NASKH:  # each word shaped; the spaces stay spaces, where lines may break
        return f'<font name="{font}">{" ".join(_shaped_word(word, font) for word in text.split(" "))}</font>'
    escaped = escape(text).replace("\t", " ")
    return escaped if font == BODY else f'<font name="{font}">{escaped}</font>'
