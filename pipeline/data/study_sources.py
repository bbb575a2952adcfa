"""Concepts of the study set: one source picture with a precise English name (and translations) each.

Two Debian packages ship thousands of named pictures offline: tuxpaint-stamps-default (clip-art PNGs
with a one-line description in many languages beside each) and fonts-noto-color-emoji (bitmap
emoji; their names come from the `emoji` package's CLDR data). Names are listed cheaply first and a
picture is rendered only for the concepts a build uses, so the tiny set takes seconds.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import emoji
from PIL import Image, ImageDraw, ImageFont

from pipeline.errors import UserError

TUXPAINT = Path("/usr/share/tuxpaint/stamps")
EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
LANGUAGES = ("de", "fr", "es", "it", "pt")  # Latin-script languages both sources translate
SOURCE_PX = 96  # longest side a source picture is kept at; scenes are smaller
EMOJI_PX = 109  # the only size the CBDT bitmap font renders at
MAX_NAME_WORDS = 4  # longer descriptions are sentences, not names
# A one-line description that is a name: optional article, words, optional full stop.
NAME = re.compile(r"(?:(?:a|an|the|some)\s+)?([a-z][a-z' -]*?)\.?", re.IGNORECASE)
SKIN_TONES = range(0x1F3FB, 0x1F400)
# Names with a colour word keep their own colours ("a blue red apple" would be nonsense), and so do people:
# a caption never calls a person by a tint colour.
COLOUR_WORDS = {"red", "yellow", "green", "blue", "purple", "pink", "brown", "gray", "grey", "white", "black",
                "orange", "silver", "gold", "golden", "colorful", "colourful"}
PEOPLE_WORDS = {"man", "men", "woman", "women", "person", "people", "boy", "boys", "girl", "girls", "baby", "child",
                "children", "kid", "kids", "family", "couple", "lady", "gentleman", "grandma", "grandpa", "fireman",
                "firefighter", "policeman", "police", "doctor", "nurse", "farmer", "clown", "pirate", "santa", "king",
                "queen", "prince", "princess", "mermaid", "merman", "astronaut", "cook", "singer", "dancer"}
REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)
NOT_A_FLAG = "\U0001F1E6\U0001F1E6"  # "AA": the font's fallback picture for flags it does not have


@dataclass(frozen=True)
class Concept:
    name: str  # lower-case English, unique in the set
    origin: str  # "tuxpaint:<path under the stamps folder>" or "emoji:<code points>"
    translations: dict[str, str] = field(default_factory=dict)  # language -> name or description
    tintable: bool = True  # False: shown in its own colours only (see COLOUR_WORDS)

    def picture(self) -> Image.Image:
        """The source picture, RGBA, cropped to its content, longest side SOURCE_PX."""
        kind, _, ref = self.origin.partition(":")
        image = _emoji_canvas("".join(chr(int(c, 16)) for c in ref.split("-"))) if kind == "emoji" else Image.open(TUXPAINT / ref).convert("RGBA")
        image = image.crop(image.getchannel("A").getbbox())
        scale = SOURCE_PX / max(image.size)
        return image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                            Image.Resampling.LANCZOS)


def list_concepts() -> list[Concept]:
    """Every usable concept, Tux Paint first, each name once (the first source with it wins)."""
    for path, package in ((TUXPAINT, "tuxpaint-stamps-default"), (EMOJI_FONT, "fonts-noto-color-emoji")):
        if not path.exists():
            raise UserError(f"the study set needs {path}: apt-get install -y {package}")
    seen: dict[str, Concept] = {}
    for concept in [*_tuxpaint_concepts(), *_emoji_concepts()]:
        seen.setdefault(concept.name, concept)
    return list(seen.values())


def _tuxpaint_concepts() -> list[Concept]:
    out = []
    for png in sorted(TUXPAINT.rglob("*.png")):
        txt = png.with_suffix(".txt")
        if not txt.is_file():
            continue
        lines = txt.read_text(encoding="utf-8", errors="replace").splitlines()
        match = NAME.fullmatch(lines[0].strip()) if lines else None
        if not match or len(match.group(1).split()) > MAX_NAME_WORDS:
            continue
        translations = {}
        for line in lines[1:]:  # "de.utf8=Ein Dachs." or "pt_BR.utf8=..."
            locale, sep, text = line.partition("=")
            lang = re.split(r"[._@]", locale, maxsplit=1)[0]
            if sep and lang in LANGUAGES and text.strip():
                translations.setdefault(lang, text.strip())
        name = " ".join(match.group(1).lower().split())
        out.append(Concept(name, f"tuxpaint:{png.relative_to(TUXPAINT)}", translations, _tintable(name)))
    return out


def _emoji_concepts() -> list[Concept]:
    """Fully qualified emoji without skin tones that the font draws as a picture of their own (not a sequence
    it cannot join, nor the fallback it shows for flags it lacks); flags are named "flag of X". Emoji that come
    in skin tones (people, hands) are not tinted."""
    for lang in LANGUAGES:
        emoji.config.load_language(lang)
    toned = {_without_modifiers(c) for c in emoji.EMOJI_DATA if any(ord(x) in SKIN_TONES for x in c)}
    fallback, drawn = _digest(_emoji_canvas(NOT_A_FLAG)), {}  # drawn: picture -> the emoji drawn so
    for char, data in sorted(emoji.EMOJI_DATA.items()):
        if data["status"] != emoji.STATUS["fully_qualified"] or any(ord(c) in SKIN_TONES for c in char):
            continue
        canvas = _emoji_canvas(char)
        box = canvas.getbbox()
        if box is None or box[2] - box[0] > 1.5 * EMOJI_PX:
            continue
        name = _emoji_name(data["en"])
        if all(ord(c) in REGIONAL_INDICATORS for c in char):
            name = f"flag of {name}"
        translations = {lang: _emoji_name(data[lang]) for lang in LANGUAGES if data.get(lang)}
        drawn.setdefault(_digest(canvas), []).append(
            Concept(name, "emoji:" + "-".join(f"{ord(c):X}" for c in char), translations,
                    _tintable(name) and _without_modifiers(char) not in toned))
    # a picture shared by several names (Norway's flag is Svalbard's) names none of them
    return [group[0] for picture, group in drawn.items() if len(group) == 1 and picture != fallback]


def _digest(image: Image.Image) -> str:
    return hashlib.sha256(image.tobytes()).hexdigest()


def _tintable(name: str) -> bool:
    return not set(re.split(r"[\s’'-]+", name)) & (COLOUR_WORDS | PEOPLE_WORDS)


def _without_modifiers(char: str) -> str:
    return "".join(c for c in char if ord(c) not in SKIN_TONES and c != "\ufe0f")


def _emoji_name(cldr: str) -> str:
    return " ".join(cldr.strip(":").replace("_", " ").lower().split())


@cache
def _emoji_font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(EMOJI_FONT), EMOJI_PX)


def _emoji_canvas(text: str) -> Image.Image:
    canvas = Image.new("RGBA", (3 * EMOJI_PX, 2 * EMOJI_PX))
    ImageDraw.Draw(canvas).text((EMOJI_PX // 4, EMOJI_PX // 4), text, font=_emoji_font(), embedded_color=True)
    return canvas
