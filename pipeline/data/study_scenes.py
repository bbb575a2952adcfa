"""Study-set scenes: attributes drawn at random, the picture rendered from them, captions written from them.

Because the builder draws every attribute (object, its colour tint, count of copies, background colour
and texture, position), a caption is a pure function of the attributes and a template, and a hard
negative is the same template applied to the attributes with exactly one of them changed to another
valid value the picture does not have (SugarCrepe/ARO-style edits; see EDITS).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from PIL import Image, ImageOps

# Colour words an object tint and a background share (none starts with a vowel, so the article before
# "<colour> <object>" is always "a"); the RGB values are far apart in hue or lightness.
PALETTE = {"red": (215, 35, 35), "yellow": (240, 210, 30), "green": (40, 150, 50), "blue": (35, 80, 215),
           "purple": (125, 50, 175), "pink": (245, 125, 185), "brown": (120, 72, 30), "gray": (128, 128, 128)}
TEXTURES = ("plain", "striped", "checkered", "dotted")
COUNTS = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
# Where one copy stands; "middle" is not written (copies > 1 always fill the middle).
POSITIONS = {"middle": "", "left": " on the left", "right": " on the right", "top": " at the top",
             "bottom": " at the bottom"}
TEMPLATES = ("{obj}, shown {count}{pos}, on {bg}.", "{bg} with {obj} shown {count}{pos}.",
             "{obj} shown {count}{pos} against {bg}.", "a picture of {obj}, shown {count}{pos}, on {bg}.",
             "clip art: {obj} shown {count}{pos} on {bg}.")
TINT_CHANCE = 0.75  # of the scenes of tintable concepts
COUNT_WEIGHTS = (0.4, 0.2, 0.2, 0.2)


@dataclass(frozen=True)
class Scene:
    object: str
    colour: str | None  # None: the source's own colours
    count: int
    background: str
    texture: str
    position: str

    def as_dict(self) -> dict:
        return asdict(self)


def sample_scene(name: str, tintable: bool, rng: np.random.Generator) -> Scene:
    colour = str(rng.choice(list(PALETTE))) if tintable and rng.random() < TINT_CHANCE else None
    count = int(rng.choice(list(COUNTS), p=COUNT_WEIGHTS))
    position = str(rng.choice(list(POSITIONS))) if count == 1 else "middle"
    background = str(rng.choice([c for c in PALETTE if c != colour]))
    return Scene(name, colour, count, background, str(rng.choice(TEXTURES)), position)


# ------------------------------------------------------------------------------------------ captions
def article(phrase: str) -> str:
    """"a"/"an" before a phrase; none before a plural-looking name ("gloves", "film frames")."""
    if phrase.endswith("s") and not phrase.endswith(("ss", "us", "is")):
        return phrase
    vowel = phrase[0] in "aeiou" and not phrase.startswith(("uni", "use", "eu", "one"))
    return f"{'an' if vowel else 'a'} {phrase}"


def caption(scene: Scene, template: int) -> str:
    obj = article(f"{scene.colour} {scene.object}" if scene.colour else scene.object)
    texture = "" if scene.texture == "plain" else f" {scene.texture}"
    return TEMPLATES[template].format(obj=obj, count=COUNTS[scene.count], pos=POSITIONS[scene.position],
                                      bg=f"a {scene.background}{texture} background")


# --------------------------------------------------------------------------------------------- edits
def _objects(scene: Scene, others: dict[str, bool], rng) -> Scene | None:
    """Another concept of the same split (`others`: name -> tintable); never one whose words contain the other's
    ("cat" vs "cat face"), and a tintable one if the scene is tinted."""
    words = set(scene.object.split())
    pool = [o for o, tintable in others.items() if not (words <= set(o.split()) or set(o.split()) <= words)
            and (tintable or scene.colour is None)]
    return replace(scene, object=str(rng.choice(pool))) if pool else None


def _colour(scene: Scene, others, rng) -> Scene | None:
    if scene.colour is None:
        return None
    return replace(scene, colour=str(rng.choice([c for c in PALETTE if c not in (scene.colour, scene.background)])))


def _count(scene: Scene, others, rng) -> Scene | None:
    if scene.position != "middle":  # a position is written for one copy only
        return None
    return replace(scene, count=int(rng.choice([n for n in COUNTS if n != scene.count])))


def _swap(scene: Scene, others, rng) -> Scene | None:
    """ARO's attribute swap: the object takes the background's colour and the background the object's."""
    return None if scene.colour is None else replace(scene, colour=scene.background, background=scene.colour)


def _position(scene: Scene, others, rng) -> Scene | None:
    if scene.position == "middle":
        return None
    return replace(scene, position=str(rng.choice([p for p in POSITIONS if p not in ("middle", scene.position)])))


# edit type -> the scene with one attribute changed to a value the picture does not have, or None
EDITS = {"object": _objects, "colour": _colour, "count": _count, "swap_attribute": _swap, "position": _position}


# ------------------------------------------------------------------------------------------ pictures
def render(scene: Scene, picture: Image.Image, px: int, rng: np.random.Generator) -> Image.Image:
    """The scene at px x px: the background, then `count` copies of the (cropped, tinted) picture."""
    canvas = _background(scene.background, scene.texture, px, rng)
    obj = _tint(_jitter_crop(picture, rng), scene.colour)
    for box in _boxes(scene, px, rng):
        copy = obj.copy()
        copy.thumbnail((box[2], box[3]), Image.Resampling.LANCZOS)
        x = box[0] + int(rng.integers(0, box[2] - copy.width + 1))
        y = box[1] + int(rng.integers(0, box[3] - copy.height + 1))
        canvas.alpha_composite(copy, (x, y))
    return canvas.convert("RGB")


def _jitter_crop(picture: Image.Image, rng) -> Image.Image:
    w, h = picture.size
    left, top, right, bottom = (rng.uniform(0, 0.08, 4) * (w, h, w, h)).astype(int)
    return picture.crop((left, top, w - right, h - bottom))


def _tint(picture: Image.Image, colour: str | None) -> Image.Image:
    """Recolour by lightness: dark parts a dark shade of the colour, light parts a pale one."""
    if colour is None:
        return picture
    rgb = np.array(PALETTE[colour])
    dark, light = tuple((rgb * 0.3).astype(int)), tuple((rgb + (255 - rgb) * 0.55).astype(int))
    tinted = ImageOps.colorize(ImageOps.grayscale(picture), dark, light, mid=PALETTE[colour]).convert("RGBA")
    tinted.putalpha(picture.getchannel("A"))
    return tinted


def _boxes(scene: Scene, px: int, rng) -> list[tuple[int, int, int, int]]:
    """(x, y, width, height) per copy: one copy in its half (or the whole canvas), copies in 2x2 cells."""
    half = px // 2
    if scene.count == 1 and scene.position == "middle":
        size = int(px * rng.uniform(0.6, 0.85))
        return [((px - size) // 2, (px - size) // 2, size, size)]
    if scene.count == 1:
        size = int(half * rng.uniform(0.85, 1))
        x = {"left": 0, "right": half}.get(scene.position, (px - size) // 2)
        y = {"top": 0, "bottom": half}.get(scene.position, (px - size) // 2)
        return [(x, y, size, size)]
    cells = rng.permutation(4)[: scene.count]
    size = int(half * rng.uniform(0.8, 0.95))
    return [(int(c % 2) * half + (half - size) // 2, int(c // 2) * half + (half - size) // 2, size, size)
            for c in cells]


def background_shades(colour: str) -> tuple[np.ndarray, np.ndarray]:
    """The background colour and the paler shade its texture is drawn in."""
    base = np.array(PALETTE[colour], dtype=float)
    return base, (base + (255 - base) * 0.35).round()


def _background(colour: str, texture: str, px: int, rng) -> Image.Image:
    """The colour, with a texture drawn in a paler shade of it (so the colour word stays true)."""
    base, pale = background_shades(colour)
    yy, xx = np.mgrid[0:px, 0:px]
    period = int(rng.integers(6, 11))
    if texture == "striped":
        mask = ((xx + yy) if rng.random() < 0.5 else yy) // (period // 2) % 2 == 1
    elif texture == "checkered":
        mask = (xx // period + yy // period) % 2 == 1
    elif texture == "dotted":
        mask = (xx % period - period / 2) ** 2 + (yy % period - period / 2) ** 2 < (period / 4) ** 2
    else:
        mask = np.zeros((px, px), dtype=bool)
    pixels = np.where(mask[..., None], pale, base).round().astype(np.uint8)
    return Image.fromarray(pixels, "RGB").convert("RGBA")
