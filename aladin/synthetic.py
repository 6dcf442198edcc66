"""A deterministic synthetic image-caption world: coloured shapes on a noisy canvas, five true captions each.

The embedded profile's stand-in for MS-COCO (ALADIN.md section 6): every image holds 2-4 objects
(`data.min_objects`..`data.max_objects`), each a (size, colour, shape) triple with a distinct
(colour, shape) pair, placed without overlap. The shape is the object category, later used as the
VinVL-style object tag. Captions are drawn from several caption families, each stating at least two facts
(attributes plus a count, a spatial relation, an extreme position or a size comparison), so that a caption
is rarely true of another image and retrieval has a single right answer most of the time.

Image k depends only on (seed, k): three numpy PCG64 streams (scene, pixels, captions) are seeded from
`SeedSequence([seed, k, stream])`, so changing the dataset size, or the caption grammar, leaves the other
images and the pixels untouched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .config import DataConfig
from .io import PipelineError

# The world. RGB values are saturated and far from the grey backgrounds below, so every colour is
# distinguishable from its neighbours and from the canvas at any noise level used here.
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (250, 120, 20),
}
SIZES = {"small": 0.08, "large": 0.14}  # circumradius as a fraction of the canvas side

GAP = 0.03  # free space between the placement squares of two objects, fraction of the side
MARGIN = 0.10  # a relation ("left of", "leftmost") needs the centres this far apart, fraction of the side
HALF_MARGIN = 0.08  # "in the left half" needs the centre this far from the middle line
MIN_IMAGE_SIZE = 32  # a small shape is then 5 pixels across
PLACE_TRIES = 100  # positions tried per object before the scene is drawn again
SCENE_TRIES = 50

# Caption vocabulary. Every literal word a caption can contain appears in one of these tuples, which
# `vocabulary()` collects for the backbone's tokenizer.
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
RELATIONS = {  # relation -> phrases, each read "<A> <phrase> <B>"
    "left": ("to the left of", "left of"),
    "right": ("to the right of", "right of"),
    "above": ("above", "higher than"),
    "below": ("below", "under", "beneath", "lower than"),
}
EXTREMES = {"x": ("leftmost", "rightmost"), "y": ("topmost", "bottommost")}
HALVES = {"x": ("left", "right"), "y": ("top", "bottom")}
LIST_OPENINGS = ("a picture of", "an image of", "a noisy background with", "a scene with")
COUNT_NOUNS = ("shapes", "objects")
FILLERS = ("a", "an", "the", "and", "is", "there", "are", "with", "which", "in", "half", "of", "it",
           "only", "shape", "one", "bigger", "larger", "smaller", "than")


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cx: float  # centre, pixels (x to the right, y down)
    cy: float
    radius: float  # circumradius, pixels; the object lies inside the square cx +- radius
    bbox: tuple[float, float, float, float]  # (x1, y1, x2, y2) of the drawn outline, pixels


@dataclass(frozen=True)
class Scene:
    index: int
    image_size: int
    background: tuple[int, int, int]  # base RGB before noise
    objects: tuple[SceneObject, ...]


def vocabulary() -> list[str]:
    """Every word any caption can contain (plus the final '.'), class names included; sorted."""
    phrases = (*SHAPES, *COLOURS, *SIZES, *NUMBERS, *COUNT_NOUNS, *FILLERS, *LIST_OPENINGS,
               *(p for ps in RELATIONS.values() for p in ps), *(w for ws in EXTREMES.values() for w in ws),
               *(w for ws in HALVES.values() for w in ws))
    return sorted({w for p in phrases for w in p.split()} | {"."})


def _rng(seed: int, index: int, stream: int) -> np.random.Generator:
    if seed < 0:
        raise PipelineError(f"seed must be >= 0 for the synthetic dataset, got {seed}")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, index, stream])))


# ---------------------------------------------------------------------------------------------------
# Geometry


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape of circumradius r centred on (cx, cy); a circle as a 32-gon."""
    if shape == "circle":  # 32 is a multiple of 4, so the polygon's box is the circle's box
        return [(cx + r * math.cos(2 * math.pi * i / 32), cy + r * math.sin(2 * math.pi * i / 32)) for i in range(32)]
    if shape == "square":
        h = 0.8 * r  # a bit under r so its area is close to the other shapes'
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.7 * r, cy), (cx, cy + r), (cx - 0.7 * r, cy)]
    if shape == "triangle":  # pointing up; shifted down by r/4 so its box is centred on (cx, cy)
        return [(cx + r * math.cos(a), cy + 0.25 * r + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":  # five points; the inner vertices at 0.45 r alternate with the outer ones
        angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
        radii = [r if i % 2 == 0 else 0.45 * r for i in range(10)]
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a)) for a, rr in zip(angles, radii)]
    if shape == "hexagon":
        return [(cx + r * math.cos(i * math.pi / 3), cy + r * math.sin(i * math.pi / 3)) for i in range(6)]
    if shape == "cross":  # a plus sign with arms 0.6 r wide
        w = 0.3 * r
        return [(cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w), (cx + r, cy + w),
                (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r), (cx - w, cy + w), (cx - r, cy + w),
                (cx - r, cy - w), (cx - w, cy - w)]
    raise ValueError(f"unknown shape {shape!r}")


def outline(obj: SceneObject) -> list[tuple[float, float]]:
    """The object's outline polygon, pixels (also its COCO segmentation)."""
    return _outline(obj.shape, obj.cx, obj.cy, obj.radius)


def area(obj: SceneObject) -> float:
    """Geometric area of the drawn shape, pixels^2 (the COCO `area` field)."""
    if obj.shape == "circle":
        return math.pi * obj.radius ** 2
    pts = outline(obj)
    return 0.5 * abs(sum(x1 * y2 - x2 * y1 for (x1, y1), (x2, y2) in zip(pts, pts[1:] + pts[:1])))


def _make_object(shape, colour, size, cx, cy, image_size) -> SceneObject:
    r = SIZES[size] * image_size
    xs, ys = zip(*_outline(shape, cx, cy, r))
    bbox = tuple(round(v, 2) for v in (min(xs), min(ys), max(xs), max(ys)))
    return SceneObject(shape, colour, size, cx, cy, r, bbox)


def make_scene(seed: int, index: int, cfg: DataConfig) -> Scene:
    """Draw the objects of image `index`: distinct (colour, shape) pairs, non-overlapping placement squares."""
    rng = _rng(seed, index, 0)
    s = cfg.image_size
    pairs = [(c, sh) for c in COLOURS for sh in SHAPES]
    if s < MIN_IMAGE_SIZE:
        raise PipelineError(f"data.image_size = {s} is too small for the synthetic shapes "
                            f"(at least {MIN_IMAGE_SIZE} pixels)")
    if cfg.max_objects > min(len(pairs), len(NUMBERS) - 1):
        raise PipelineError(f"data.max_objects = {cfg.max_objects} is more than the synthetic world can "
                            f"describe ({min(len(pairs), len(NUMBERS) - 1)})")
    for _ in range(SCENE_TRIES):
        n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        chosen = rng.choice(len(pairs), size=n, replace=False)
        sizes = rng.integers(0, len(SIZES), size=n)
        objects = []
        for k, sz in zip(chosen, sizes):
            colour, shape = pairs[int(k)]
            size = list(SIZES)[int(sz)]
            r = SIZES[size] * s
            for _ in range(PLACE_TRIES):
                cx, cy = (round(float(v), 2) for v in rng.uniform(r, s - r, size=2))
                if all(max(abs(cx - o.cx), abs(cy - o.cy)) >= r + o.radius + GAP * s for o in objects):
                    objects.append(_make_object(shape, colour, size, cx, cy, s))
                    break
            else:
                break  # this object did not fit: draw the whole scene again
        if len(objects) == n:
            light = rng.random() < 0.5
            base = rng.integers(185, 231) if light else rng.integers(25, 71)
            tint = rng.integers(-8, 9, size=3)
            background = tuple(int(v) for v in np.clip(base + tint, 0, 255))
            return Scene(index, s, background, tuple(objects))
    raise PipelineError(f"could not place {cfg.max_objects} non-overlapping objects on a {s}x{s} canvas "
                        f"(data.max_objects / data.image_size)")


def render(scene: Scene, seed: int, noise_std: float) -> Image.Image:
    """The RGB image: noisy background, then flat-coloured shapes (no anti-aliasing: exact colours)."""
    rng = _rng(seed, scene.index, 1)
    s = scene.image_size
    pixels = rng.standard_normal((s, s, 3), dtype=np.float32) * np.float32(noise_std)  # (H, W, 3)
    pixels += np.asarray(scene.background, dtype=np.float32)
    np.clip(np.rint(pixels, out=pixels), 0, 255, out=pixels)
    image = Image.fromarray(pixels.astype(np.uint8), mode="RGB")
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        fill = COLOURS[obj.colour]
        if obj.shape == "circle":
            r = obj.radius
            draw.ellipse([(obj.cx - r, obj.cy - r), (obj.cx + r, obj.cy + r)], fill=fill)
        else:
            draw.polygon(outline(obj), fill=fill)
    return image


# ---------------------------------------------------------------------------------------------------
# Captions


def relation(a: SceneObject, b: SceneObject, image_size: int) -> list[str]:
    """The relations "a <rel> b" that hold with the margin, e.g. ['left', 'below']."""
    m = MARGIN * image_size
    out = []
    if b.cx - a.cx >= m:
        out.append("left")
    if a.cx - b.cx >= m:
        out.append("right")
    if b.cy - a.cy >= m:  # y grows downwards
        out.append("above")
    if a.cy - b.cy >= m:
        out.append("below")
    return out


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _np(obj: SceneObject, det: str = "a", size: bool = True) -> str:
    words = " ".join(([obj.size] if size else []) + [obj.colour, obj.shape])
    return _article(words) if det == "a" else f"{det} {words}"


def _pick(rng: np.random.Generator, items):
    return items[int(rng.integers(len(items)))]


def _list(scene, rng):
    objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]
    return f"{_pick(rng, LIST_OPENINGS)} " + " and ".join(_np(o) for o in objs)


def _related_pairs(scene):
    s = scene.image_size
    return [(a, b, rel) for a in scene.objects for b in scene.objects if a is not b
            for rel in relation(a, b, s)]


def _count_relation(scene, rng):
    pairs = _related_pairs(scene)
    if not pairs:
        return None
    a, b, rel = _pick(rng, pairs)
    n, noun, phrase = NUMBERS[len(scene.objects)], _pick(rng, COUNT_NOUNS), _pick(rng, RELATIONS[rel])
    if rng.random() < 0.5:
        return f"there are {n} {noun} and {_np(a, 'the')} is {phrase} {_np(b, 'the')}"
    return f"{n} {noun} with {_np(a)} {phrase} {_np(b)}"


def _chain(scene, rng):
    s = scene.image_size
    chains = [(a, b, c, r1, r2) for a, b, r1 in _related_pairs(scene) for c in scene.objects
              if c is not a and c is not b for r2 in relation(b, c, s)]
    if not chains:
        return None
    a, b, c, r1, r2 = _pick(rng, chains)
    return (f"{_np(a, 'the')} is {_pick(rng, RELATIONS[r1])} {_np(b, 'the')} "
            f"which is {_pick(rng, RELATIONS[r2])} {_np(c, 'the')}")


def _extremes(scene, rng):
    m = MARGIN * scene.image_size
    options = []
    for axis, (low_word, high_word) in EXTREMES.items():
        key = (lambda o: o.cx) if axis == "x" else (lambda o: o.cy)
        order = sorted(scene.objects, key=key)
        if len(order) >= 2 and key(order[1]) - key(order[0]) >= m and key(order[-1]) - key(order[-2]) >= m:
            options.append(((low_word, order[0]), (high_word, order[-1])))
    if not options:
        return None
    first, second = _pick(rng, options)
    if rng.random() < 0.5:
        first, second = second, first
    noun = _pick(rng, ("shape", "one"))
    return f"the {first[0]} shape is {_np(first[1])} and the {second[0]} {noun} is {_np(second[1])}"


def _size_relation(scene, rng):
    pairs = [(a, b, rel) for a, b, rel in _related_pairs(scene) if a.size != b.size]
    if not pairs:
        return None
    a, b, rel = _pick(rng, pairs)
    cmp = "smaller" if a.size == "small" else _pick(rng, ("bigger", "larger"))
    n, noun = NUMBERS[len(scene.objects)], _pick(rng, COUNT_NOUNS)
    return (f"of the {n} {noun} {_np(a, 'the', size=False)} is {cmp} than {_np(b, 'the', size=False)} "
            f"and {_pick(rng, RELATIONS[rel])} it")


def _halves(obj: SceneObject, image_size: int) -> list[str]:
    mid, m = image_size / 2, HALF_MARGIN * image_size
    out = []
    for axis, (low, high) in HALVES.items():
        c = obj.cx if axis == "x" else obj.cy
        if c <= mid - m:
            out.append(low)
        elif c >= mid + m:
            out.append(high)
    return out


def _half(scene, rng):
    s = scene.image_size
    placed = [(o, h) for o in scene.objects for h in _halves(o, s)]
    if len(scene.objects) == 1:
        if not placed:
            return None
        o, h = _pick(rng, placed)
        return f"the only shape is {_np(o)} and it is in the {h} half"
    pairs = [(p, q) for p in placed for q in placed if p[0] is not q[0]]
    if not pairs:
        return None
    (a, ha), (b, hb) = _pick(rng, pairs)
    return f"{_np(a, 'the')} is in the {ha} half and {_np(b, 'the')} is in the {hb} half"


FAMILIES = (_list, _count_relation, _chain, _extremes, _size_relation, _half)


def captions(scene: Scene, seed: int, n: int) -> list[str]:
    """`n` true captions of `scene`, from as many different caption families as apply, in random order."""
    rng = _rng(seed, scene.index, 2)
    out: list[str] = []
    order = [FAMILIES[i] for i in rng.permutation(len(FAMILIES))]
    tries = 0
    while len(out) < n:
        # The first pass visits each family once; later passes (few families apply, or n > 6) repeat them.
        family = order[tries % len(order)]
        tries += 1
        text = family(scene, rng)
        if text is None:
            continue
        stop = "." if rng.random() < 0.5 else ""
        if all(text != c.rstrip(".") for c in out) or tries > 20 * len(FAMILIES):
            out.append(text + stop)  # distinct unless a one-object scene has run out of ways to say it
    return out


@dataclass(frozen=True)
class Example:
    scene: Scene
    image: Image.Image
    captions: list[str]


def generate(seed: int, index: int, cfg: DataConfig) -> Example:
    """Image `index` of the world seeded by `seed`: its scene, rendered image and captions."""
    scene = make_scene(seed, index, cfg)
    return Example(scene, render(scene, seed, cfg.background_noise),
                   captions(scene, seed, cfg.captions_per_image))
