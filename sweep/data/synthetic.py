"""The embedded data: procedurally rendered scenes of coloured shapes with compositional captions.

A scene is one to three shapes, each with a colour, a shape, a size and a position, on a dark background.
Captions name all of it with nouns, adjectives, verbs and prepositions, e.g.

    "a large red circle rests above a small blue square and a small green cross floats at the bottom right
     on a gray background"

so that the 32-token context is mostly used and truncation to 8 or 4 tokens loses what the later words said.
The verbs are chosen at random and carry no visual information, as in real alt-text.

Everything is a pure function of (seed, split, index): the same sample renders the same pixels and caption in
every process, with no download and no file. Splits draw from independent random streams, so the held-out
zero-shot and retrieval scenes are not training scenes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 220, 50),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240), "pink": (245, 130, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond", "cross")
SIZES = {"small": 0.10, "large": 0.19}  # radius as a fraction of the image side
BACKGROUNDS = {"black": (10, 10, 10), "gray": (85, 85, 85), "navy": (15, 20, 70), "brown": (70, 45, 25)}
VERBS = ("sits", "rests", "floats", "lies", "stands", "hovers")
# 3 x 3 cells of the image; an object's cell names where it is
PLACES = (("at the top left", "at the top", "at the top right"),
          ("on the left", "in the middle", "on the right"),
          ("at the bottom left", "at the bottom", "at the bottom right"))

# zero-shot classes: colour x shape ("red circle"), 40 classes, chance = 2.5 %
CLASSNAMES = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)
TEMPLATES = ("a {}.", "a photo of a {}.", "a drawing of a {}.", "a {} on a background.", "a picture of a {}.")

SPLITS = {"train": 0, "retrieval": 1, "zeroshot": 2}


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    x: float  # centre, fraction of the image side
    y: float

    @property
    def place(self) -> str:
        return PLACES[min(int(self.y * 3), 2)][min(int(self.x * 3), 2)]


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str
    verbs: tuple[str, ...]


def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS[split], index])


def sample_scene(rng: np.random.Generator, n_shapes: int | None = None) -> Scene:
    n = int(rng.integers(1, 4)) if n_shapes is None else n_shapes
    shapes = []
    for _ in range(n):
        for _attempt in range(20):  # rejection sampling keeps shapes from sitting on top of each other
            size = str(rng.choice(list(SIZES)))
            r = SIZES[size]
            x, y = rng.uniform(r, 1 - r, size=2)
            if all(np.hypot(x - s.x, y - s.y) > r + SIZES[s.size] for s in shapes):
                break
        shapes.append(Shape(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), size, float(x), float(y)))
    return Scene(tuple(shapes), str(rng.choice(list(BACKGROUNDS))), tuple(str(v) for v in rng.choice(VERBS, 2)))


def _relation(a: Shape, b: Shape) -> str:
    """Where a is relative to b, along the axis where they differ most."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"


def caption(scene: Scene) -> str:
    def noun_phrase(s: Shape) -> str:
        return f"a {s.size} {s.colour} {s.shape}"

    first, *rest = scene.shapes
    if not rest:
        text = f"{noun_phrase(first)} {scene.verbs[0]} {first.place}"
    else:
        text = f"{noun_phrase(first)} {scene.verbs[0]} {_relation(first, rest[0])} {noun_phrase(rest[0])}"
        if len(rest) == 2:
            text += f" and {noun_phrase(rest[1])} {scene.verbs[1]} {rest[1].place}"
    return f"{text} on a {scene.background} background"


def render(scene: Scene, image_size: int) -> np.ndarray:
    """The scene as a uint8 array [3, H, W]."""
    img = Image.new("RGB", (image_size, image_size), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for s in scene.shapes:
        cx, cy, r = s.x * image_size, s.y * image_size, SIZES[s.size] * image_size
        fill = COLOURS[s.colour]
        if s.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif s.shape == "square":
            q = r * 0.85
            draw.rectangle((cx - q, cy - q, cx + q, cy + q), fill=fill)
        elif s.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        elif s.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=fill)
        elif s.shape == "cross":
            t = r * 0.35
            draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
            draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    return np.asarray(img).transpose(2, 0, 1)


def image_caption_pairs(seed: int, split: str, start: int, count: int, image_size: int
                        ) -> tuple[np.ndarray, list[str]]:
    """Samples ``start .. start+count-1`` of a split: images uint8 [count, 3, H, W] and their captions."""
    images = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    captions = []
    for i in range(count):
        scene = sample_scene(_rng(seed, split, start + i))
        images[i] = render(scene, image_size)
        captions.append(caption(scene))
    return images, captions


def zeroshot_set(seed: int, count: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Held-out single-shape scenes and their class index into CLASSNAMES (balanced over classes)."""
    images = np.empty((count, 3, image_size, image_size), dtype=np.uint8)
    labels = np.arange(count) % len(CLASSNAMES)
    for i in range(count):
        rng = _rng(seed, "zeroshot", i)
        colour, shape = CLASSNAMES[labels[i]].split()
        base = sample_scene(rng, n_shapes=1).shapes[0]
        scene = Scene((Shape(colour, shape, base.size, base.x, base.y),), str(rng.choice(list(BACKGROUNDS))),
                      ("sits", "sits"))
        images[i] = render(scene, image_size)
    return images, labels
