"""Make the report's font for CJK characters beyond the Basic Multilingual Plane (Extension B and later).

Noto Sans CJK (SIL OFL 1.1) draws about 2,400 of them (𠮷, names in Hong Kong and Japan), but it is 19 MB of
PostScript (CFF) outlines, which reportlab cannot embed. This keeps the glyphs of those characters only (the
Basic Multilingual Plane is drawn with reportlab's CID fonts), with quadratic (TrueType) outlines, about
1 MB, shipped in services/review/fonts. Run again to take a newer Noto Sans CJK:

    apt-get install fonts-noto-cjk
    python -m scripts.cjk_supplement_font /usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fontTools import subset
from fontTools.pens.cu2quPen import Cu2QuPen
from fontTools.pens.ttGlyphPen import TTGlyphPen
from fontTools.ttLib import TTCollection, TTFont, newTable

OUT = Path(__file__).parent.parent / "services" / "review" / "fonts" / "NotoSansCJK-Supplement-Regular.ttf"
FIRST = 0x20000  # CJK Unified Ideographs Extension B; the planes after it hold the later extensions
FAMILY = "Noto Sans CJK Supplement"


def supplement(font: TTFont) -> TTFont:
    """The font with the glyphs of the characters from FIRST on only, their outlines made quadratic."""
    chars = [code for code in font.getBestCmap() if code >= FIRST]
    options = subset.Options()
    options.layout_features = []
    options.hinting = False
    options.notdef_outline = True
    options.name_IDs = [0, 1, 2, 3, 4, 5, 6, 13, 14]
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=chars)
    subsetter.subset(font)
    _quadratic(font)
    _rename(font)
    return font


def _quadratic(font: TTFont) -> None:
    """CFF outlines to TrueType (glyf) ones, as fontTools' otf2ttf example does."""
    order = font.getGlyphOrder()
    glyphs = font.getGlyphSet()
    glyf = newTable("glyf")
    glyf.glyphOrder = order
    glyf.glyphs = {}
    for name in order:
        pen = TTGlyphPen(glyphs)
        glyphs[name].draw(Cu2QuPen(pen, max_err=1.0, reverse_direction=True))
        glyf.glyphs[name] = pen.glyph()
    font["glyf"] = glyf
    font["loca"] = newTable("loca")
    del font["CFF "]
    if "VORG" in font:
        del font["VORG"]
    maxp = font["maxp"]
    maxp.tableVersion = 0x00010000
    for field in (
        "maxZones",
        "maxTwilightPoints",
        "maxStorage",
        "maxFunctionDefs",
        "maxInstructionDefs",
        "maxStackElements",
        "maxSizeOfInstructions",
        "maxComponentElements",
    ):
        setattr(maxp, field, 1 if field == "maxZones" else 0)
    maxp.maxComponentDepth = 0
    font["head"].indexToLocFormat = 1
    font["head"].glyphDataFormat = 0
    post = font["post"]
    post.formatType = 2.0
    post.extraNames = []
    post.mapping = {}
    post.glyphOrder = order
    font.sfntVersion = "\x00\x01\x00\x00"


def _rename(font: TTFont) -> None:
    names = font["name"]
    for record in names.names:
        if record.nameID in (1, 16):
            record.string = FAMILY
        elif record.nameID == 4:
            record.string = f"{FAMILY} Regular"
        elif record.nameID == 6:
            record.string = "NotoSansCJK-Supplement-Regular"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("collection", type=Path, help="NotoSansCJK-Regular.ttc (Debian: fonts-noto-cjk)")
    parser.add_argument("--face", default="Noto Sans CJK JP", help="the face of the collection to take")
    args = parser.parse_args()
    faces = TTCollection(str(args.collection)).fonts
    face = next(f for f in faces if f["name"].getDebugName(4) == args.face)
    supplement(face).save(str(OUT))
    print(f"{OUT}: {OUT.stat().st_size} bytes")


if __name__ == "__main__":
    main()
