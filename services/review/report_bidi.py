"""Right-to-left text as the report draws it: Arabic letters joined, each line in visual order.

reportlab draws characters left to right in the order it is given them, each in its isolated form: Hebrew came
out mirrored and Arabic as unjoined letters, backwards. Its own right-to-left support (`wordWrap="RTL"`)
needs `rlbidi`, which is not on PyPI, and its shaping (uharfbuzz) does not reorder; so the report does what
xhtml2pdf does: arabic-reshaper gives each Arabic (Persian) letter its joined form, the presentation forms
DejaVu Sans draws, and python-bidi (the Unicode Bidirectional Algorithm) says each character's direction, by
which a line is put into the order it is drawn in, numbers and Latin words in it left to right. A line is
reordered once it is broken: report_paragraphs.py breaks paragraphs with right-to-left text itself. A line with
a letter DejaVu Sans lacks (Urdu's ہ, ے) has its Arabic letters drawn in Noto Naskh Arabic instead, each run
taken back to logical order and shaped by HarfBuzz (report_fonts.py), which also places its marks.
"""

from __future__ import annotations

import re
import unicodedata

from arabic_reshaper import ArabicReshaper
from arabic_reshaper.letters import LETTERS_ARABIC
from bidi import get_base_level, get_display
from bidi.mirror import MIRRORED

# Hebrew, Arabic, Syriac, Thaana, NKo, Samaritan, Mandaic and their presentation forms: strongly right to left.
RIGHT_TO_LEFT = re.compile("[\u0590-\u08ff\ufb1d-\ufdff\ufe70-\ufefc]")
# Harakat kept (they are text); no ligature but lam-alef, the ones DejaVu Sans draws (not U+FDF2 Allah).
_RESHAPER = ArabicReshaper(configuration={"delete_harakat": False, "ARABIC LIGATURE ALLAH": False})
_LETTER_OF_FORM = {form: letter for letter, forms in LETTERS_ARABIC.items() for form in forms if form}


def right_to_left(text: str) -> bool:
    """Whether `text` has a right-to-left letter (it then needs reordering, and Arabic joining)."""
    return RIGHT_TO_LEFT.search(text) is not None


def arabic_joined(text: str) -> str:
    """Arabic letters in the form they take beside their neighbours (presentation forms), in logical order."""
    return str(_RESHAPER.reshape(text)) if right_to_left(text) else text


def letter_of_form(char: str) -> str:
    """The letter a presentation form is a form of (the character itself if it is none)."""
    return _LETTER_OF_FORM.get(char, char)


def base_right_to_left(line: str) -> bool:
    """Whether the line reads right to left: its first strong letter is (Unicode Bidirectional Algorithm P2)."""
    return right_to_left(line) and get_base_level(line) == 1


def visual(line: str, *, rtl: bool | None = None) -> str:
    """One line (already `joined`) in the order it is drawn, left to right; `rtl` is the direction of the
    paragraph it belongs to (by default its own first strong letter). python-bidi resolves the levels (its
    Rust algorithm, with bracket pairs), and here they are applied: a mirrored character (a bracket) in a
    right-to-left run drawn as its mirror image (L4), then the runs reversed (L2: a mark comes out before
    its letter, which is where DejaVu Sans draws Hebrew and Arabic marks from); python-bidi's own
    `get_display` leaves brackets unmirrored, so "(12 mm)" read ")12 mm(" in Hebrew."""
    if not right_to_left(line):
        return line
    base = 0 if rtl is False else 1 if rtl else get_base_level(line)
    levels = _levels(line, base)
    if levels is None:  # not the python-bidi this was written for: its order, brackets unmirrored
        return get_display(line, base_dir="R" if base else "L")
    drawn = [(MIRRORED.get(c, c) if level % 2 else c, level) for c, level in zip(line, levels, strict=True)]
    for level in range(max(levels), min([lv for lv in levels if lv % 2], default=max(levels) + 1) - 1, -1):
        start = 0
        while start < len(drawn):
            if drawn[start][1] < level:
                start += 1
                continue
            end = start
            while end < len(drawn) and drawn[end][1] >= level:
                end += 1
            drawn[start:end] = reversed(drawn[start:end])
            start = end
    return "".join(c for c, _ in drawn)


_LEVEL = re.compile(r"Level\(\s*(\d+),?\s*\)")


def _levels(line: str, base: int) -> list[int] | None:
    """The resolved embedding level of each character of one line (rules up to L1), or None if python-bidi
    does not say them as expected."""
    info = get_display(line, base_dir="R" if base else "L", debug=True)
    start, end = info.find("levels: ["), info.find("paragraphs: [")
    by_byte = [int(level) for level in _LEVEL.findall(info[start:end])] if 0 <= start < end else []
    if len(by_byte) != len(line.encode()):
        return None
    levels, at = [], 0
    for c in line:
        levels.append(by_byte[at])
        at += len(c.encode())
    # L1: whitespace at the end of the line, and before a tab, goes back to the paragraph's level.
    trailing = True
    for i in range(len(line) - 1, -1, -1):
        kind = unicodedata.bidirectional(line[i])
        if kind == "S":
            levels[i], trailing = base, True
        elif kind == "WS" and trailing:
            levels[i] = base
        else:
            trailing = False
    return levels
