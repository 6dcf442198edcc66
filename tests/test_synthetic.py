"""The synthetic world: determinism, geometry against rendered pixels, and caption truth.

Caption truth is checked by an independent reader written here: it parses each caption with its own
grammar (the skeletons below) and evaluates it on the scene's objects, without the generator's code.
"""
from __future__ import annotations

import io
import itertools
import re

import numpy as np
import pytest

from aladin import synthetic
from aladin.config import DataConfig
from aladin.io import PipelineError

# The test's own copy of the world's words: a change to the world must be made here on purpose.
SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross", "hexagon")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6}
REL = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
       "above": "above", "higher than": "above", "below": "below", "under": "below", "beneath": "below",
       "lower than": "below"}

NP_RE = re.compile(rf"\b(a|an|the) (?:(small|large) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})\b")
R = "(" + "|".join(sorted(REL, key=len, reverse=True)) + ")"
N = "(" + "|".join(NUMBER) + ") (?:shapes|objects)"
SKELETONS = {  # family -> regex over the caption with every noun phrase replaced by NP
    "list": r"(?:a picture of|an image of|a noisy background with|a scene with) NP(?: and NP)*",
    "count_relation": rf"(?:there are {N} and NP is {R} NP|{N} with NP {R} NP)",
    "chain": rf"NP is {R} NP which is {R} NP",
    "extremes": r"the (leftmost|rightmost|topmost|bottommost) shape is NP and the "
                r"(leftmost|rightmost|topmost|bottommost) (?:shape|one) is NP",
    "size_relation": rf"of the {N} NP is (smaller|bigger|larger) than NP and {R} it",
    "half": r"(?:NP is in the (left|right|top|bottom) half and NP is in the (left|right|top|bottom) half"
            r"|the only shape is NP and it is in the (left|right|top|bottom) half)",
}


def parse(caption: str):
    """(family, regex groups, noun phrases as (det, size | None, colour, shape))."""
    nps = [m.groups() for m in NP_RE.finditer(caption)]
    skeleton = NP_RE.sub("NP", caption.removesuffix("."))
    for family, pattern in SKELETONS.items():
        m = re.fullmatch(pattern, skeleton)
        if m:
            return family, [g for g in m.groups() if g is not None], nps
    raise AssertionError(f"caption outside the grammar: {caption!r}")


def holds(caption: str, objects, image_size: int, margin: float) -> bool:
    """Is `caption` true of `objects` (SceneObject-like: shape, colour, size, cx, cy)? Positions must differ
    by more than margin * image_size."""
    family, groups, nps = parse(caption)
    m = margin * image_size

    def matches(np_):
        det, size, colour, shape = np_
        found = [o for o in objects if o.shape == shape and o.colour == colour and size in (None, o.size)]
        return [] if det == "the" and len(found) != 1 else found  # "the" presupposes a unique object

    def rel(a, b, r):
        return {"left": b.cx - a.cx, "right": a.cx - b.cx, "above": b.cy - a.cy, "below": a.cy - b.cy}[r] > m

    def half(o, h):
        c = o.cx if h in ("left", "right") else o.cy
        return c < image_size / 2 - m if h in ("left", "top") else c > image_size / 2 + m

    def count_ok(word):
        return len(objects) == NUMBER[word]

    if family == "list":
        want = [(n[1], n[2], n[3]) for n in nps]
        return len(want) == len(objects) and any(
            all(w == (o.size, o.colour, o.shape) for w, o in zip(want, perm))
            for perm in itertools.permutations(objects))
    if family == "count_relation":
        word, r = groups
        return count_ok(word) and any(rel(a, b, REL[r]) for a in matches(nps[0]) for b in matches(nps[1]) if a is not b)
    if family == "chain":
        r1, r2 = groups
        return any(rel(a, b, REL[r1]) and rel(b, c, REL[r2])
                   for a in matches(nps[0]) for b in matches(nps[1]) for c in matches(nps[2])
                   if len({id(a), id(b), id(c)}) == 3)
    if family == "extremes":
        def extreme(word):
            key = {"leftmost": lambda o: o.cx, "rightmost": lambda o: -o.cx,
                   "topmost": lambda o: o.cy, "bottommost": lambda o: -o.cy}[word]
            first, *rest = sorted(objects, key=key)
            return first if all(key(o) - key(first) > m for o in rest) and rest else None
        return all(extreme(w) is not None and extreme(w) in matches(n) for w, n in zip(groups, nps))
    if family == "size_relation":
        word, cmp, r = groups
        wanted = ("small", "large") if cmp == "smaller" else ("large", "small")
        return count_ok(word) and any((a.size, b.size) == wanted and rel(a, b, REL[r])
                                      for a in matches(nps[0]) for b in matches(nps[1]) if a is not b)
    if family == "half":
        if len(nps) == 1:
            return len(objects) == 1 and any(half(o, groups[0]) for o in matches(nps[0]))
        return any(half(a, groups[0]) and half(b, groups[1])
                   for a in matches(nps[0]) for b in matches(nps[1]) if a is not b)
    raise AssertionError(family)


CONFIGS = [DataConfig(image_size=64, min_objects=2, max_objects=4),
           DataConfig(image_size=64, min_objects=1, max_objects=1),
           DataConfig(image_size=96, min_objects=4, max_objects=5, captions_per_image=7)]


def test_world_matches_the_test_vocabulary():
    assert synthetic.SHAPES == SHAPES and tuple(synthetic.COLOURS) == COLOURS
    assert set(synthetic.SIZES) == {"small", "large"}
    colours = np.array(list(synthetic.COLOURS.values()), dtype=int)
    gaps = np.abs(colours[:, None] - colours[None]).sum(-1)[~np.eye(len(colours), dtype=bool)]
    assert gaps.min() >= 90  # every pair of colours differs clearly (L1 distance in RGB)


@pytest.mark.parametrize("cfg", CONFIGS)
def test_every_caption_is_true_of_its_scene(cfg):
    vocab = set(synthetic.vocabulary())
    for k in range(40):
        scene = synthetic.make_scene(3, k, cfg)
        caps = synthetic.captions(scene, 3, cfg.captions_per_image)
        assert len(caps) == cfg.captions_per_image
        assert cfg.min_objects <= len(scene.objects) <= cfg.max_objects
        for c in caps:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*\.?", c), c
            assert set(c.removesuffix(".").split()) <= vocab, c
            assert holds(c, scene.objects, cfg.image_size, margin=0.05), (c, scene)
        if len(scene.objects) >= 2:
            assert len({c.removesuffix(".") for c in caps}) == len(caps)  # no repeats
            assert len({parse(c)[0] for c in caps}) >= 3, caps  # varied families


OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "under": "above",
            "beneath": "above", "higher": "lower", "lower": "higher", "smaller": "bigger", "bigger": "smaller",
            "larger": "smaller", "top": "bottom", "bottom": "top", "leftmost": "rightmost",
            "rightmost": "leftmost", "topmost": "bottommost", "bottommost": "topmost"}


def test_checker_rejects_false_captions():
    """The reader above is not vacuous: a caption moved to the wrong scene or negated fails."""
    cfg = CONFIGS[0]
    scene = synthetic.make_scene(0, 0, cfg)
    for c in synthetic.captions(scene, 0, 5):
        family = parse(c)[0]
        flipped = re.sub(r"\b(" + "|".join(OPPOSITE) + r")\b", lambda m: OPPOSITE[m.group(1)], c)
        if family == "list":  # drop the last object of an exhaustive list
            flipped = c.removesuffix(".").rsplit(" and ", 1)[0]
        assert not holds(flipped, scene.objects, cfg.image_size, margin=0.0), flipped


def test_objects_are_inside_the_canvas_and_do_not_overlap():
    for cfg in CONFIGS:
        for k in range(40):
            scene = synthetic.make_scene(1, k, cfg)
            assert len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects)
            for o in scene.objects:
                x1, y1, x2, y2 = o.bbox
                assert 0 <= x1 < x2 <= cfg.image_size and 0 <= y1 < y2 <= cfg.image_size
            for a, b in itertools.combinations(scene.objects, 2):
                ax1, ay1, ax2, ay2 = a.bbox
                bx1, by1, bx2, by2 = b.bbox
                assert ax2 < bx1 or bx2 < ax1 or ay2 < by1 or by2 < ay1, (a, b)


def test_boxes_match_the_rendered_pixels():
    cfg = DataConfig(image_size=64)
    for k in range(15):
        example = synthetic.generate(5, k, cfg)
        pixels = np.asarray(example.image)  # (H, W, 3) uint8
        assert pixels.shape == (64, 64, 3)
        for o in example.scene.objects:
            rgb = np.array(synthetic.COLOURS[o.colour], dtype=np.uint8)
            mask = (pixels == rgb).all(-1)  # (H, W) exact colour: shapes are drawn without anti-aliasing
            x1, y1, x2, y2 = o.bbox
            near = np.zeros_like(mask)
            near[max(int(y1) - 2, 0):int(y2) + 3, max(int(x1) - 2, 0):int(x2) + 3] = True
            ys, xs = np.nonzero(mask & near)
            # Pixel i covers [i, i + 1): the drawn extent agrees with the box to about a pixel.
            assert abs(xs.min() - x1) <= 1.5 and abs(xs.max() + 1 - x2) <= 1.5, o
            assert abs(ys.min() - y1) <= 1.5 and abs(ys.max() + 1 - y2) <= 1.5, o
            inside = mask[int(np.ceil(y1)):int(y2), int(np.ceil(x1)):int(x2)]
            assert inside.mean() > 0.3, o  # the object's colour dominates its box (a star fills about 38%)
        # No pixel of an object colour outside the boxes of the objects that have it.
        for colour in {o.colour for o in example.scene.objects}:
            mask = (pixels == np.array(synthetic.COLOURS[colour], dtype=np.uint8)).all(-1)
            for o in example.scene.objects:
                if o.colour == colour:
                    x1, y1, x2, y2 = o.bbox
                    mask[max(int(y1) - 1, 0):int(y2) + 2, max(int(x1) - 1, 0):int(x2) + 2] = False
            assert not mask.any()


def test_background_is_noisy_with_the_configured_std():
    cfg = DataConfig(image_size=64, background_noise=12.0)
    for k in range(4):
        example = synthetic.generate(0, k, cfg)
        pixels = np.asarray(example.image).astype(float)  # (H, W, 3)
        free = np.ones(pixels.shape[:2], dtype=bool)
        for o in example.scene.objects:
            x1, y1, x2, y2 = o.bbox
            free[max(int(y1) - 1, 0):int(y2) + 2, max(int(x1) - 1, 0):int(x2) + 2] = False
        background = pixels[free]  # (n_free, 3)
        assert np.abs(background.mean(0) - example.scene.background).max() < 1.5
        assert np.all(np.abs(background.std(0) - 12.0) < 1.5)  # clipping at 0 / 255 barely matters here
        assert max(example.scene.background) <= 80 or min(example.scene.background) >= 175  # dark or light


def _png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_generation_is_deterministic_and_per_image():
    cfg = DataConfig(image_size=64)
    a = [synthetic.generate(7, k, cfg) for k in range(6)]
    b = [synthetic.generate(7, k, cfg) for k in reversed(range(6))][::-1]  # other order, same images
    for x, y in zip(a, b):
        assert _png_bytes(x.image) == _png_bytes(y.image) and x.captions == y.captions and x.scene == y.scene
    other_seed = synthetic.generate(8, 0, cfg)
    assert _png_bytes(other_seed.image) != _png_bytes(a[0].image)
    # The caption count draws from its own stream: asking for more captions keeps the first ones.
    more = synthetic.captions(a[0].scene, 7, 6)
    assert more[:5] == a[0].captions


def test_vocabulary_covers_class_names_and_is_sorted():
    vocab = synthetic.vocabulary()
    assert vocab == sorted(set(vocab))
    assert set(SHAPES) | set(COLOURS) | {"small", "large", "."} <= set(vocab)


def test_captions_identify_their_image():
    """Retrieval has a right answer: few captions are also true of another image of a 200-image set."""
    cfg = DataConfig()
    scenes = [synthetic.make_scene(0, k, cfg) for k in range(200)]
    ambiguous = total = 0
    for i, scene in enumerate(scenes):
        for c in synthetic.captions(scene, 0, 5):
            total += 1
            # margin 0: count a caption as true elsewhere even when a relation holds by a hair
            ambiguous += any(holds(c, other.objects, cfg.image_size, margin=0.0)
                             for j, other in enumerate(scenes) if j != i)
    fraction = ambiguous / total
    print(f"captions also true of another image: {ambiguous}/{total} = {fraction:.3f}")
    assert fraction < 0.10


def test_impossible_scenes_fail_clearly():
    with pytest.raises(PipelineError, match="data.image_size = 16 is too small"):
        synthetic.make_scene(0, 0, DataConfig(image_size=16))
    with pytest.raises(PipelineError, match="data.max_objects"):
        synthetic.make_scene(0, 0, DataConfig(min_objects=2, max_objects=11))
    with pytest.raises(PipelineError, match="seed"):
        synthetic.make_scene(-1, 0, DataConfig())
