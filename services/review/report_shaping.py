"""Text in scripts whose letters change shape with their neighbours, drawn as the font's OpenType rules say.

Devanagari joins consonants into conjuncts (क + ् + ष is one glyph, क्ष), draws the vowel sign ि before the
consonant it follows and the repha ( र् before a consonant) above the end of its syllable; Thai puts a tone mark
above a vowel mark, smaller, and moves marks aside over a narrow consonant. reportlab draws one glyph per
character, each where the one before it ends (its own HarfBuzz shaping gives the glyphs it makes no text in the
PDF's ToUnicode map, so the words cannot be copied or searched). So a run of such text is shaped here by
HarfBuzz (uharfbuzz), which says which of the font's glyphs to draw and where, and each glyph so placed is
given a character of its own in the font it is drawn in (`ShapedFont`), from the Supplementary Private Use
Areas: drawn as that glyph, as wide as HarfBuzz advances it, and written in the ToUnicode map as the text it
stands for: the whole cluster (the syllable) for its first glyph, nothing for the others, so copying the text
gives back the characters as they were written, in the order written. A glyph HarfBuzz moves aside (an x
offset) is preceded by an empty one as wide as the move, and is itself narrower by as much; one it moves up or
down (a y offset) is drawn risen (report_fonts). Urdu in Noto Naskh Arabic is shaped the same way, right to left:
HarfBuzz joins its letters, places its marks and gives the glyphs in the order they are drawn.

`ShapedFont` is also how characters beyond U+FFFF are drawn: reportlab writes them in its ToUnicode map as
five hex digits, which PDF readers cannot parse, and text extraction lost the whole line; this map writes
UTF-16, a character beyond U+FFFF as its surrogate pair.
"""

from __future__ import annotations

import threading
from functools import lru_cache

import uharfbuzz as hb
from reportlab.pdfbase import pdfdoc, pdfmetrics
from reportlab.pdfbase.ttfonts import SUBSETN, TTFont

# Supplementary Private Use Area-A and -B: no font of the report draws a character there (font_for finds none).
PRIVATE_A, PRIVATE_B, PRIVATE_SIZE = 0xF0000, 0x100000, 0xFFFE
BFCHAR_ENTRIES = 100  # at most 100 entries per beginbfchar (PDF 32000-1, 9.10.3)


class FontFull(RuntimeError):
    """Every private-use character of a font stands for a placed glyph already (131,068 of them)."""


class ShapedFont(TTFont):
    """A TrueType font whose ToUnicode map is right beyond U+FFFF, and that draws shaped glyphs (`placed`)."""

    def __init__(self, name: str, path: str) -> None:
        # reportlab's own shaping stays off: these fonts are shaped here (`shaped`).
        super().__init__(name, path, shapable=False)
        self.cmap = frozenset(self.face.charToGlyph)  # the characters the font draws, before any is placed
        self.hb_font = hb.Font(hb.Face(hb.Blob(self.face._ttf_data)))
        self.units_per_em = self.hb_font.face.upem
        self._texts: dict[int, str] = {}
        self._placed: dict[tuple[int, int, str], str] = {}
        self._lock = threading.Lock()

    def placed(self, glyph: int, width: int, text: str) -> str:
        """The character drawn as `glyph`, `width` thousandths of the font size wide, that stands for `text`."""
        key = (glyph, width, text)
        char = self._placed.get(key)
        if char is not None:
            return char
        with self._lock:
            char = self._placed.get(key)
            if char is None:
                n = len(self._placed)
                if n >= 2 * PRIVATE_SIZE:
                    raise FontFull(f"{self.fontName} has no private-use character left for another glyph")
                code = PRIVATE_A + n if n < PRIVATE_SIZE else PRIVATE_B + n - PRIVATE_SIZE
                self.face.charToGlyph[code] = glyph
                self.face.charWidths[code] = width
                self._texts[code] = text
                char = self._placed[key] = chr(code)
        return char

    def text_of(self, code: int) -> str:
        """What the character stands for in the ToUnicode map."""
        return self._texts.get(code, chr(code))

    def scaled(self, units: int) -> int:
        """Font units in thousandths of the font size."""
        return round(units * 1000 / self.units_per_em)

    def addObjects(self, doc: pdfdoc.PDFDocument) -> None:  # noqa: N802
        """reportlab's TTFont.addObjects, the ToUnicode map made by `to_unicode_cmap`."""
        try:
            state = self.state[doc]
        except KeyError:
            state = self.state[doc] = TTFont.State(self._asciiReadable)
        state.frozen = 1
        for n, subset in enumerate(state.subsets):
            internal_name = self.getSubsetInternalName(n, doc)[1:]
            base_font_name = b"".join((SUBSETN(n), b"+", self.face.name, self.face.subfontNameX)).decode(
                "pdfdoc"
            )
            pdf_font = pdfdoc.PDFTrueTypeFont()
            pdf_font.__Comment__ = f"Font {self.fontName} subset {n}"
            pdf_font.Name = internal_name
            pdf_font.BaseFont = base_font_name
            pdf_font.FirstChar = 0
            pdf_font.LastChar = len(subset) - 1
            pdf_font.Widths = pdfdoc.PDFArray(list(map(self.face.getCharWidth, subset)))
            cmap = pdfdoc.PDFStream()
            cmap.content = to_unicode_cmap(base_font_name, [self.text_of(code) for code in subset])
            if doc.compression:
                cmap.filters = [pdfdoc.PDFZCompress]
            pdf_font.ToUnicode = doc.Reference(cmap, "toUnicodeCMap:" + base_font_name)
            pdf_font.FontDescriptor = self.face.addSubsetObjects(doc, base_font_name, subset)
            doc.Reference(pdf_font, internal_name)
            doc.idToObject["BasicFonts"].dict[internal_name] = pdf_font
        del self.state[doc]


def to_unicode_cmap(name: str, texts: list[str]) -> str:
    """A ToUnicode CMap: one-byte code i stands for texts[i], in UTF-16 (any length, or empty)."""
    entries = [f"<{i:02X}> <{text.encode('utf-16-be').hex().upper()}>" for i, text in enumerate(texts)]
    blocks = [entries[i : i + BFCHAR_ENTRIES] for i in range(0, len(entries), BFCHAR_ENTRIES)]
    return "\n".join(
        [
            "/CIDInit /ProcSet findresource begin",
            "12 dict begin",
            "begincmap",
            f"/CIDSystemInfo << /Registry ({name}) /Ordering ({name}) /Supplement 0 >> def",
            f"/CMapName /{name} def",
            "/CMapType 2 def",
            "1 begincodespacerange",
            f"<00> <{len(texts) - 1:02X}>",
            "endcodespacerange",
            *(line for block in blocks for line in (f"{len(block)} beginbfchar", *block, "endbfchar")),
            "endcmap",
            "CMapName currentdict /CMap defineresource pop",
            "end",
            "end",
        ]
    )


@lru_cache(maxsize=4096)
def shaped(text: str, font_name: str, *, rtl: bool = False) -> tuple[tuple[str, int], ...]:
    """`text`, a run of one script in one font in logical order, as the characters that draw its shaped glyphs
    left to right (HarfBuzz puts a right-to-left run in visual order), in pieces drawn at one height:
    (characters, how far above the baseline in thousandths of the font size)."""
    font = pdfmetrics.getFont(font_name)
    assert isinstance(font, ShapedFont), f"{font_name} is not a ShapedFont"
    buffer = hb.Buffer()
    buffer.add_str(text)
    buffer.guess_segment_properties()
    buffer.direction = "rtl" if rtl else "ltr"
    hb.shape(font.hb_font, buffer, {})
    infos, positions = buffer.glyph_infos, buffer.glyph_positions
    # A cluster (a syllable, a letter with its marks) runs from its first character to the next cluster's.
    starts = sorted({info.cluster for info in infos})
    ends = dict(zip(starts, [*starts[1:], len(text)], strict=True))
    blank = font.face.charToGlyph.get(0x20, 0)
    pieces: list[tuple[str, int]] = []
    seen: set[int] = set()
    for info, position in zip(infos, positions, strict=True):
        cluster = info.cluster
        stands_for = "" if cluster in seen else text[cluster : ends[cluster]]
        seen.add(cluster)
        advance, offset = font.scaled(position.x_advance), font.scaled(position.x_offset)
        drawn = font.placed(info.codepoint, advance - offset, stands_for)
        if offset:
            drawn = font.placed(blank, offset, "") + drawn
        rise = font.scaled(position.y_offset)
        if pieces and pieces[-1][1] == rise:
            pieces[-1] = (pieces[-1][0] + drawn, rise)
        else:
            pieces.append((drawn, rise))
    return tuple(pieces)
