"""Right-to-left text on the report as a reader sees it: the characters drawn on each line, left to right.

pypdf's `extract_text` turns right-to-left runs back into reading order by its own guess, so it cannot tell a
PDF drawn in visual order from one drawn backwards: these tests read what each line draws from the content
stream, through each font's ToUnicode map."""

from __future__ import annotations

import dataclasses
import io
import itertools
import re
import time

from pypdf import PdfReader
from pypdf.generic import ContentStream, DictionaryObject

from services.review.report_fonts import describe_characters, unprintable
from services.review.report_pdf import COLUMN_WIDTH, ReportContent, render_report_pdf
from tests.unit.test_review_report import content, pdf_text


@dataclasses.dataclass(frozen=True)
class Glyph:
    """One glyph a PDF draws: the text its font's ToUnicode map says it stands for (a whole syllable for the
    first glyph of a shaped cluster, "" for the others), the font, its advance (thousandths of the font size)
    and how far it is drawn above the baseline (points; below if negative)."""

    text: str
    font: str
    width: float
    rise: float = 0.0


def drawn_glyphs(pdf: bytes) -> list[list[Glyph]]:
    """The glyphs of each line of text the PDF draws, in the order they are drawn (left to right)."""
    lines: list[list[Glyph]] = []
    line: list[Glyph] = []
    for page in PdfReader(io.BytesIO(pdf)).pages:
        fonts = {name: _Font(ref.get_object()) for name, ref in page["/Resources"]["/Font"].items()}
        font, rise = None, 0.0
        for operands, operator in ContentStream(page.get_contents(), page.pdf).operations:
            if operator == b"Tf":
                font = fonts[operands[0]]
            elif operator == b"Ts":
                rise = float(operands[0])
            elif operator == b"Tj":
                assert font is not None
                line += font.glyphs(operands[0].original_bytes, rise)
            elif operator in (b"ET", b"T*", b"Tm") or (operator in (b"Td", b"TD") and float(operands[1])):
                if "".join(g.text for g in line).strip():
                    lines.append(line)
                line = []
    return lines


def drawn_lines(pdf: bytes) -> list[str]:
    """Each line of text the PDF draws, its characters in the order they are drawn (left to right)."""
    return ["".join(glyph.text for glyph in line) for line in drawn_glyphs(pdf)]


class _Font:
    def __init__(self, font: DictionaryObject) -> None:
        self.name = str(font["/BaseFont"]).lstrip("/").split("+")[-1]
        self.cid = font["/Subtype"] == "/Type0"  # reportlab's CJK fonts: two-byte UCS-2 codes, not embedded
        self.to_unicode = _to_unicode(font) if "/ToUnicode" in font else None
        first = int(font.get("/FirstChar", 0))
        self.widths = {first + i: float(w) for i, w in enumerate(font.get("/Widths", []))}

    def glyphs(self, raw: bytes, rise: float) -> list[Glyph]:
        if self.cid:
            return [Glyph(c, self.name, 1000, rise) for c in raw.decode("utf-16-be")]
        if self.to_unicode is None:  # a standard font (the list bullets): its codes are Latin-1
            return [Glyph(chr(b), self.name, 0, rise) for b in raw]
        return [Glyph(self.to_unicode[b], self.name, self.widths.get(b, 0), rise) for b in raw]


def _to_unicode(font: DictionaryObject) -> dict[int, str]:
    cmap = font["/ToUnicode"].get_object().get_data().decode("latin-1")
    pairs = re.findall(
        r"<([0-9A-Fa-f]+)>\s*<([0-9A-Fa-f]*)>", "".join(re.findall(r"beginbfchar(.*?)endbfchar", cmap, re.S))
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


def named(given: str, family: str, **findings: object) -> ReportContent:
    c = written(**findings)
    patient = c.request.patient.model_copy(update={"given_name": given, "family_name": family})
    return dataclasses.replace(c, request=c.request.model_copy(update={"patient": patient}))


def line_with(lines: list[list[Glyph]], text: str) -> list[Glyph]:
    found = [line for line in lines if text in "".join(g.text for g in line)]
    assert found, f"no line draws {text!r}: {['.'.join(g.text for g in line) for line in lines]}"
    return found[0]


def glyphs_of(line: list[Glyph], word: str) -> list[Glyph]:
    """The glyphs that draw `word` in the line (from the glyph standing for its first cluster to the next one
    that stands for text after it)."""
    drawn = "".join(g.text for g in line)
    start = drawn.index(word)
    at, glyphs = 0, []
    for glyph in line:
        if start <= at < start + len(word) or (glyphs and at == start + len(word) and not glyph.text):
            glyphs.append(glyph)
        at += len(glyph.text)
    return glyphs


def test_a_devanagari_name_is_drawn_shaped_with_its_conjuncts_and_vowel_signs_in_place() -> None:
    """Devanagari was refused at submission and printed as [U+0915][U+094D]... from the referring side: a
    conjunct (क्ष: क + ् + ष) must be one glyph, the vowel sign ि drawn before the consonant it follows."""
    pdf = render_report_pdf(named("क्षत्रिय", "शर्मा", findings="त्र क्षत्रिय: कोई रक्त प्रवाह नहीं। कर्क"))

    lines = drawn_glyphs(pdf)

    name = glyphs_of(line_with(lines, "क्षत्रिय शर्मा"), "क्षत्रिय")
    # क्ष is one glyph; त्रि is the vowel sign drawn first, then the conjunct त्र; then य.
    assert [g.text for g in name] == ["क्ष", "त्रि", "", "य"]
    assert {g.font for g in name} == {"NotoSansDevanagari-Regular"}
    findings = line_with(lines, "त्र क्षत्रिय")
    alone = glyphs_of(findings, "त्र")  # the conjunct drawn alone: the same glyph as after the vowel sign
    assert len(alone) == 1 and name[2].width == alone[0].width != name[1].width
    # The repha (र् before क) is drawn above the consonant's end, after it: moved back, taking no room.
    repha = glyphs_of(findings, "र्क")
    assert [g.text for g in repha] == ["र्क", "", ""] and repha[1].width < 0 == repha[1].width + repha[2].width
    # Copying or searching the PDF gives back the text as written.
    text = pdf_text(pdf)
    assert "क्षत्रिय शर्मा" in text and "त्र क्षत्रिय: कोई रक्त प्रवाह नहीं। कर्क" in text


def test_thai_is_drawn_with_its_marks_placed_over_the_consonant_not_beside_it() -> None:
    """Thai was printed as [U+0E2A]...: its vowel and tone marks must take no room of their own, and a tone mark
    over a vowel mark is moved down onto it."""
    pdf = render_report_pdf(named("สมชาย", "ใจดี", findings="ที่ กิ่ง"))

    lines = drawn_glyphs(pdf)

    assert [g.text for g in glyphs_of(line_with(lines, "สมชาย ใจดี"), "สมชาย")] == list("สมชาย")
    thi = glyphs_of(line_with(lines, "ที่ กิ่ง"), "ที่")
    assert thi[0].text == "ที่" and {g.text for g in thi[1:]} == {""} and len(thi) >= 3  # ท, ี, ่
    assert thi[0].width > 0 and sum(g.width for g in thi[1:]) == 0  # the marks are not spacing glyphs
    ki = glyphs_of(line_with(lines, "ที่ กิ่ง"), "กิ่")
    assert ki[0].rise == 0 and min(g.rise for g in ki) < 0  # mai ek lowered onto sara i
    assert "ที่ กิ่ง" in pdf_text(pdf)


def test_urdu_heh_goal_and_yeh_barree_are_drawn_joined() -> None:
    """DejaVu Sans has no heh goal (ہ) or yeh barree (ے): Urdu was printed as [U+06C1][U+06D2]."""
    pdf = render_report_pdf(written(impression="یہ ہے ہ"))

    line = line_with(drawn_glyphs(pdf), "ے")

    # Left to right as drawn, the words read from the right: ہ alone, ہے (ے, then ہ), یہ (ہ, then ی).
    assert "".join(g.text for g in line) == "ہ ےہ ہی"
    alone, initial, final = line[0], line[3], line[5]
    assert (
        len({alone.width, initial.width, final.width}) == 3
    )  # heh goal alone, joined to what follows, to what precedes
    assert {g.font for g in line} == {"NotoNaskhArabic-Regular"}  # the line in one design
    assert "یہ ہے ہ" in pdf_text(pdf)


def test_chinese_japanese_and_korean_are_drawn_in_their_own_fonts() -> None:
    pdf = render_report_pdf(named("山田 ひろし", "김", findings="囊肿 2 cm。嚢胞。낭종."))

    lines = drawn_glyphs(pdf)

    fonts = {g.text: g.font for g in line_with(lines, "囊肿 2 cm。嚢胞。낭종.")}
    assert (fonts["囊"], fonts["嚢"], fonts["낭"]) == ("STSong-Light", "STSong-Light", "HYSMyeongJo-Medium")
    assert {g.text: g.font for g in line_with(lines, "山田 ひろし")}["ひ"] == "HeiseiMin-W3"
    assert "山田 ひろし 김" in pdf_text(pdf)


def test_characters_beyond_u_ffff_are_drawn_and_extracted() -> None:
    """An Extension B ideograph in a name (𠮷, the "tsuchi-yoshi" of 𠮷野) was printed [U+20BB7], and the few
    characters DejaVu Sans has beyond U+FFFF were refused: reportlab's ToUnicode entry for them (five hex
    digits) is one PDF readers cannot parse, and the line was lost to copying and searching."""
    pdf = render_report_pdf(named("𠮷野", "𠀋", findings="Smiles 😀 𝔸"))

    lines = drawn_glyphs(pdf)

    name = line_with(lines, "𠮷野 𠀋")
    assert {g.text: g.font for g in name}["𠮷"] == "NotoSansCJK-Supplement-Regular"
    assert line_with(lines, "Smiles 😀 𝔸")
    text = pdf_text(pdf)
    assert "𠮷野 𠀋" in text and "Smiles 😀 𝔸" in text


def test_what_no_font_draws_is_still_named() -> None:
    assert unprintable("क्षत्रिय สมชาย ہے 山田 𠮷 😀 🙂 \x07 \u0378") == ["🙂", "\x07", "\u0378"]
    assert describe_characters(["\u0378"]) == "U+0378 a private-use or unassigned character"


def test_a_long_report_in_devanagari_and_thai_is_composed_in_seconds() -> None:
    """Shaping must not make the longest texts (20,000 characters each) slow to compose."""
    hindi = "दाएँ अंडाशय में 6 सेमी की जटिल पुटी, मोटे सेप्टा और ठोस गांठ के साथ।"
    thai = "ก้อนซีสต์ที่รังไข่ขวา 6 ซม. มีผนังกั้นหนาและก้อนเนื้อ"
    findings = "\n".join(f"{hindi} {i}" for i in range(20_000 // (len(hindi) + 6)))
    impression = "\n".join(f"{thai} {i}" for i in range(20_000 // (len(thai) + 6)))

    started = time.monotonic()
    pdf = render_report_pdf(written(findings=findings[:20_000], impression=impression[:20_000]))
    composed_in = time.monotonic() - started

    assert composed_in < 15, f"composed in {composed_in:.1f} s"
    assert f"{hindi} 17" in pdf_text(pdf)


def test_an_urdu_paragraph_is_broken_into_lines_at_the_width_it_is_drawn_at() -> None:
    """Urdu lines were measured in DejaVu Sans and drawn in the narrower Noto Naskh Arabic: each line of a long
    paragraph ended a word or two short of the column, ragged on the left."""
    sentence = "مریض کی بائیں بیضہ دانی میں سادہ سسٹ ہے، کوئی بہاؤ نہیں۔"
    lines = drawn_glyphs(render_report_pdf(written(findings=" ".join([sentence] * 6))))

    urdu = [line for line in lines if any(g.font == "NotoNaskhArabic-Regular" for g in line)]
    size = 9.5  # the body text's

    def width(glyphs: list[Glyph]) -> float:
        return sum(g.width for g in glyphs) * size / 1000

    assert len(urdu) > 3
    for line, after in itertools.pairwise(urdu):
        # Read from the right, the next line starts with its rightmost word: it did not fit on this line.
        next_word = after[max(i for i, g in enumerate(after) if g.text == " ") + 1 :]
        space = width([next(g for g in line if g.text == " ")])
        assert width(line) <= COLUMN_WIDTH < width(line) + space + width(next_word)
