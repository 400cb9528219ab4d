"""Procedural captioned scenes: coloured shapes on a plain background, generated without any download.

The scene grammar is small on purpose, so that a few-million-parameter text-to-image model can learn it on a
CPU, yet compositional enough that the denoiser must read the caption through cross-attention:

* one object: ``"a large red circle on the left"``, ``"a small blue triangle at the top"``;
* two objects in a spatial relation: ``"a blue square above a yellow triangle"``,
  ``"a green circle to the left of a red square"``.

A :class:`SceneSpec` is the semantic content of a scene (what the caption says). Rendering adds the
nuisance variables that the caption does not fix (exact position jitter, exact size, colour jitter,
background grey level and gradient), drawn from a seeded ``numpy.random.Generator``; everything is
deterministic given the seed. Geometry is defined on a 32x32 canvas and scaled to other image sizes.

Public functions: :func:`sample_scene_spec`, :func:`caption_scene`, :func:`parse_caption`,
:func:`render_scene`, :func:`all_scene_specs`, :func:`all_captions`, :func:`render_dataset`.
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image

__all__ = [
    "SHAPES",
    "COLORS",
    "COLOR_RGB",
    "POSITIONS",
    "SIZES",
    "RELATIONS",
    "POSITION_ANCHORS",
    "SIZE_RANGES",
    "REFERENCE_SIZE",
    "SceneObject",
    "SceneSpec",
    "PlacedObject",
    "sample_scene_spec",
    "caption_scene",
    "parse_caption",
    "place_objects",
    "shape_coverage",
    "render_placements",
    "render_scene",
    "all_scene_specs",
    "all_captions",
    "render_dataset",
]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
SIZES: tuple[str, ...] = ("small", "large")
# Relation of objects[0] to objects[1] in two-object scenes.
RELATIONS: tuple[str, ...] = ("above", "below", "left of", "right of")

# Saturated base colours, far apart in hue (red ~0, yellow ~50, green ~130, blue ~225 degrees) so that a
# hue-based segmentation (see ``adherence.py``) separates them reliably.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (45, 175, 70),
    "blue": (45, 85, 220),
    "yellow": (230, 200, 45),
}

# All geometry below is in pixels of a REFERENCE_SIZE x REFERENCE_SIZE canvas (x to the right, y down).
REFERENCE_SIZE = 32
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (9.0, 16.0),
    "right": (23.0, 16.0),
    "top": (16.0, 9.0),
    "bottom": (16.0, 23.0),
    "center": (16.0, 16.0),
}
POSITION_JITTER = 1.5
# Side of the shape's bounding box. "medium" is used for the (size-less) objects of two-object scenes.
SIZE_RANGES: dict[str, tuple[float, float]] = {
    "small": (8.0, 9.5),
    "medium": (10.0, 11.0),
    "large": (13.0, 15.0),
}
# Two-object scenes: the pair sits on the relation's axis, at these coordinates along it ...
PAIR_AXIS_COORDS = (9.5, 22.5)
# ... and is jittered independently across it by up to this much around the canvas centre.
PAIR_CROSS_JITTER = 4.0
COLOR_JITTER = 10
BACKGROUND_GREY_RANGE = (70.0, 120.0)
BACKGROUND_GRADIENT = 8.0  # peak amplitude of the background's linear brightness gradient
BACKGROUND_TINT = 4.0  # per-channel offset, keeps the background almost unsaturated

_POSITION_PHRASES: dict[str, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
_RELATION_PHRASES: dict[str, str] = {
    "above": "above",
    "below": "below",
    "left of": "to the left of",
    "right of": "to the right of",
}

RandomSource = np.random.Generator | int | None


@dataclass(frozen=True)
class SceneObject:
    """One shape as a caption describes it.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`.
        size: ``"small"``/``"large"``, or ``None`` when the caption does not say (two-object scenes).
        position: one of :data:`POSITIONS` for single-object scenes, else ``None``.
    """

    shape: str
    color: str
    size: str | None = None
    position: str | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}; expected one of {SHAPES}")
        if self.color not in COLORS:
            raise ValueError(f"unknown colour {self.color!r}; expected one of {COLORS}")
        if self.size is not None and self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}; expected one of {SIZES} or None")
        if self.position is not None and self.position not in POSITIONS:
            raise ValueError(f"unknown position {self.position!r}; expected one of {POSITIONS} or None")


@dataclass(frozen=True)
class SceneSpec:
    """The semantic content of a scene: one object with a position, or two objects in a relation.

    Attributes:
        objects: one or two :class:`SceneObject`.
        relation: for two objects, how ``objects[0]`` sits relative to ``objects[1]`` (one of
            :data:`RELATIONS`); ``None`` for one object.
    """

    objects: tuple[SceneObject, ...]
    relation: str | None = None

    def __post_init__(self) -> None:
        if len(self.objects) == 1:
            if self.relation is not None:
                raise ValueError("a single-object scene has no relation")
            if self.objects[0].position is None:
                raise ValueError("a single-object scene needs a position")
        elif len(self.objects) == 2:
            if self.relation not in RELATIONS:
                raise ValueError(f"two-object scenes need a relation in {RELATIONS}, got {self.relation!r}")
            if any(obj.position is not None for obj in self.objects):
                raise ValueError("objects of a two-object scene are placed by the relation, not by a position")
        else:
            raise ValueError(f"a scene has one or two objects, got {len(self.objects)}")


@dataclass(frozen=True)
class PlacedObject:
    """A concrete, renderable shape: pixel geometry on the reference canvas and an RGB colour."""

    shape: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]  # (x, y) on the REFERENCE_SIZE canvas
    side: float  # side of the bounding box on the REFERENCE_SIZE canvas


def _as_generator(rng: RandomSource) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


def sample_scene_spec(rng: RandomSource = None, two_object_probability: float = 0.5) -> SceneSpec:
    """Draw a random scene from the grammar.

    Args:
        rng: a ``numpy.random.Generator`` or an int seed (``None``: fresh entropy).
        two_object_probability: probability of a two-object (relation) scene.

    Returns:
        A :class:`SceneSpec`; the two objects of a relation scene always have different colours.
    """
    rng = _as_generator(rng)
    if rng.random() < two_object_probability:
        first_color, second_color = rng.choice(len(COLORS), size=2, replace=False)
        objects = (
            SceneObject(shape=SHAPES[rng.integers(len(SHAPES))], color=COLORS[first_color]),
            SceneObject(shape=SHAPES[rng.integers(len(SHAPES))], color=COLORS[second_color]),
        )
        return SceneSpec(objects=objects, relation=RELATIONS[rng.integers(len(RELATIONS))])
    obj = SceneObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=COLORS[rng.integers(len(COLORS))],
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
    )
    return SceneSpec(objects=(obj,))


def _describe(obj: SceneObject) -> str:
    words = ["a"]
    if obj.size is not None:
        words.append(obj.size)
    words += [obj.color, obj.shape]
    return " ".join(words)


def caption_scene(spec: SceneSpec) -> str:
    """The canonical caption of a scene, e.g. ``"a large red circle on the left"``.

    :func:`parse_caption` inverts it exactly: ``parse_caption(caption_scene(spec)) == spec``.
    """
    if spec.relation is None:
        obj = spec.objects[0]
        return f"{_describe(obj)} {_POSITION_PHRASES[obj.position]}"
    first, second = spec.objects
    return f"{_describe(first)} {_RELATION_PHRASES[spec.relation]} {_describe(second)}"


# "{p}" becomes the group-name prefix ("a" for the first object, "b" for the second).
_OBJECT_PATTERN = (
    rf"an? (?:(?P<{{p}}size>{'|'.join(SIZES)}) )?"
    rf"(?P<{{p}}color>{'|'.join(COLORS)}) (?P<{{p}}shape>{'|'.join(SHAPES)})"
)
_SINGLE_RE = re.compile(
    "^" + _OBJECT_PATTERN.format(p="a")
    + " (?P<position>" + "|".join(re.escape(p) for p in _POSITION_PHRASES.values()) + ")$"
)
_PAIR_RE = re.compile(
    "^" + _OBJECT_PATTERN.format(p="a")
    + " (?P<relation>" + "|".join(re.escape(r) for r in _RELATION_PHRASES.values()) + ") "
    + _OBJECT_PATTERN.format(p="b") + "$"
)


def parse_caption(caption: str) -> SceneSpec:
    """Parse a caption of the scene grammar back into a :class:`SceneSpec`.

    Case, surrounding whitespace, repeated spaces and a trailing period are ignored.

    Raises:
        ValueError: if the caption is not in the grammar.
    """
    text = " ".join(caption.strip().lower().rstrip(".").split())
    match = _SINGLE_RE.match(text)
    if match is not None:
        position = {phrase: name for name, phrase in _POSITION_PHRASES.items()}[match["position"]]
        obj = SceneObject(shape=match["ashape"], color=match["acolor"], size=match["asize"], position=position)
        return SceneSpec(objects=(obj,))
    match = _PAIR_RE.match(text)
    if match is not None:
        relation = {phrase: name for name, phrase in _RELATION_PHRASES.items()}[match["relation"]]
        objects = (
            SceneObject(shape=match["ashape"], color=match["acolor"], size=match["asize"]),
            SceneObject(shape=match["bshape"], color=match["bcolor"], size=match["bsize"]),
        )
        return SceneSpec(objects=objects, relation=relation)
    raise ValueError(f"caption is not in the scene grammar: {caption!r}")


def _jittered_rgb(color: str, rng: np.random.Generator) -> tuple[int, int, int]:
    base = np.asarray(COLOR_RGB[color], dtype=np.int64)
    rgb = np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, size=3), 0, 255)
    return tuple(int(c) for c in rgb)


def place_objects(spec: SceneSpec, rng: RandomSource = None) -> list[PlacedObject]:
    """Choose the concrete geometry and colour of every object of ``spec`` (on the reference canvas).

    Single objects sit at their position's anchor (see :data:`POSITION_ANCHORS`) with a small jitter.
    Pairs sit on the relation's axis (vertical for above/below, horizontal for left of/right of), one on
    each side of the centre, with independent jitter across the axis; they never overlap.
    """
    rng = _as_generator(rng)
    placed = []
    if spec.relation is None:
        obj = spec.objects[0]
        anchor_x, anchor_y = POSITION_ANCHORS[obj.position]
        low, high = SIZE_RANGES[obj.size or "medium"]
        side = float(rng.uniform(low, high))
        center = (
            anchor_x + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
            anchor_y + float(rng.uniform(-POSITION_JITTER, POSITION_JITTER)),
        )
        placed.append(PlacedObject(obj.shape, _jittered_rgb(obj.color, rng), center, side))
        return placed

    # objects[0] comes first along the axis for "above"/"left of", second for "below"/"right of".
    first_on_axis = spec.relation in ("above", "left of")
    vertical = spec.relation in ("above", "below")
    for index, obj in enumerate(spec.objects):
        along = PAIR_AXIS_COORDS[0] if (index == 0) == first_on_axis else PAIR_AXIS_COORDS[1]
        across = REFERENCE_SIZE / 2 + float(rng.uniform(-PAIR_CROSS_JITTER, PAIR_CROSS_JITTER))
        center = (across, along) if vertical else (along, across)
        low, high = SIZE_RANGES[obj.size or "medium"]
        side = float(rng.uniform(low, high))
        placed.append(PlacedObject(obj.shape, _jittered_rgb(obj.color, rng), center, side))
    return placed


def shape_coverage(
    shape: str, center: tuple[float, float], width: float, height: float, image_size: int, supersample: int = 4
) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] (H x W float32) of one shape whose bounding box is ``width x height``.

    ``center``, ``width`` and ``height`` are in pixels of the ``image_size`` canvas. Circles are ellipses
    inscribed in the box, squares fill it, triangles point up with their base on the box's bottom edge.
    """
    n = image_size * supersample
    coords = (np.arange(n, dtype=np.float32) + 0.5) / supersample  # sub-pixel centres in image pixels
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx = (x - center[0]) / (width / 2)
    dy = (y - center[1]) / (height / 2)  # -1 at the top edge of the box, +1 at the bottom edge
    if shape == "circle":
        inside = dx * dx + dy * dy <= 1.0
    elif shape == "square":
        inside = (np.abs(dx) <= 1.0) & (np.abs(dy) <= 1.0)
    elif shape == "triangle":
        # Apex at (0, -1), base from (-1, 1) to (1, 1): the half-width grows linearly from 0 to 1.
        inside = (dy >= -1.0) & (dy <= 1.0) & (np.abs(dx) <= (dy + 1.0) / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3)).astype(np.float32)


def render_placements(
    placed: Sequence[PlacedObject], rng: RandomSource = None, image_size: int = REFERENCE_SIZE
) -> np.ndarray:
    """Render placed objects over a random near-grey background; returns an ``H x W x 3`` uint8 array."""
    rng = _as_generator(rng)
    scale = image_size / REFERENCE_SIZE
    grey = rng.uniform(*BACKGROUND_GREY_RANGE)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    angle = rng.uniform(0.0, 2.0 * np.pi)
    coords = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size - 0.5  # in [-0.5, 0.5)
    y, x = np.meshgrid(coords, coords, indexing="ij")
    gradient = 2.0 * BACKGROUND_GRADIENT * (np.cos(angle) * x + np.sin(angle) * y)
    image = (grey + gradient)[..., None] + tint[None, None, :]
    for obj in placed:
        coverage = shape_coverage(
            obj.shape,
            (obj.center[0] * scale, obj.center[1] * scale),
            obj.side * scale,
            obj.side * scale,
            image_size,
        )[..., None]
        image = image * (1.0 - coverage) + np.asarray(obj.rgb, dtype=np.float32) * coverage
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_scene(spec: SceneSpec, rng: RandomSource = None, image_size: int = REFERENCE_SIZE) -> Image.Image:
    """Render a scene to an RGB PIL image, deterministically for a given seed.

    Args:
        spec: what to draw.
        rng: a ``numpy.random.Generator`` or an int seed for the nuisance variables (jitter, background).
        image_size: side of the square output image in pixels.
    """
    rng = _as_generator(rng)
    placed = place_objects(spec, rng)
    return Image.fromarray(render_placements(placed, rng, image_size), mode="RGB")


def all_scene_specs() -> list[SceneSpec]:
    """Every scene of the grammar, in a fixed order (120 single-object + 432 two-object scenes)."""
    specs = []
    for shape in SHAPES:
        for color in COLORS:
            for size in SIZES:
                for position in POSITIONS:
                    specs.append(SceneSpec(objects=(SceneObject(shape, color, size, position),)))
    for relation in RELATIONS:
        for shape_a in SHAPES:
            for color_a in COLORS:
                for shape_b in SHAPES:
                    for color_b in COLORS:
                        if color_a == color_b:
                            continue
                        objects = (SceneObject(shape_a, color_a), SceneObject(shape_b, color_b))
                        specs.append(SceneSpec(objects=objects, relation=relation))
    return specs


def all_captions() -> list[str]:
    """The canonical captions of :func:`all_scene_specs`, in the same order."""
    return [caption_scene(spec) for spec in all_scene_specs()]


def render_dataset(
    num_images: int,
    seed: int,
    image_size: int = REFERENCE_SIZE,
    exclude_captions: Iterable[str] = (),
    two_object_probability: float = 0.5,
) -> tuple[np.ndarray, list[str]]:
    """Render ``num_images`` random scenes whose captions are not in ``exclude_captions``.

    Returns:
        ``(images, captions)``: a ``N x H x W x 3`` uint8 array and the matching captions.
    """
    rng = np.random.default_rng(seed)
    excluded = set(exclude_captions)
    images = np.empty((num_images, image_size, image_size, 3), dtype=np.uint8)
    captions: list[str] = []
    while len(captions) < num_images:
        spec = sample_scene_spec(rng, two_object_probability)
        caption = caption_scene(spec)
        if caption in excluded:
            continue
        images[len(captions)] = render_placements(place_objects(spec, rng), rng, image_size)
        captions.append(caption)
    return images, captions
