"""Automatic prompt adherence for the scene grammar of :mod:`scenes`: does an image show what its caption asks?

The check is classical image analysis, pure numpy, and explainable attribute by attribute:

1. **Colour segmentation.** Scene backgrounds are near-grey and object colours are saturated, so a pixel
   belongs to an object iff its chroma (max - min of RGB) is high; its hue then names the colour
   (red / yellow / green / blue hue sectors around the base colours of :data:`scenes.COLOR_RGB`).
2. **Objects** are the 8-connected components of each colour class with at least ``min_area`` pixels.
3. **Shape**: the component is compared with filled circle / square / up-pointing triangle templates fitted
   to its bounding box; the template with the highest IoU names the shape (if that IoU is high enough).
4. **Position** (one-object scenes): the nearest of the anchors of :data:`scenes.POSITION_ANCHORS` to the
   bounding-box centre. **Size**: the bounding-box side against a threshold between "small" and "large".
   **Relation** (two-object scenes): the dominant axis and sign of the offset between the two centres.
5. **Count**: the number of objects found equals the number requested (penalises extra blobs).

Every attribute gets a score in [0, 1] (for two objects, the fraction of objects that are right), and the
overall adherence is their product, so an image adheres (1.0) only when everything asked for is there and
nothing else is. A blank image, a wrong colour (the requested colour is then absent) or a wrong position
scores 0.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np
from PIL import Image

from .scenes import (
    COLORS,
    POSITION_ANCHORS,
    REFERENCE_SIZE,
    SHAPES,
    SIZE_RANGES,
    SceneSpec,
    parse_caption,
    shape_coverage,
)

__all__ = [
    "DetectedObject",
    "AdherenceResult",
    "image_to_rgb_array",
    "segment_colors",
    "detect_objects",
    "evaluate_adherence",
    "summarize_adherence",
]

ImageLike = Union[Image.Image, np.ndarray, "torch.Tensor"]  # noqa: F821  (torch is optional here)

# A pixel is "coloured" when max(RGB) - min(RGB) reaches this (in [0, 1] units). Backgrounds stay below
# ~0.04; the base colours are above 0.5, anti-aliased edges cross the threshold at roughly half coverage.
MIN_CHROMA = 0.2
# Hue sectors in degrees, [start, end): the base colours sit near red 0, yellow 50, green 130, blue 225.
HUE_SECTORS: dict[str, tuple[tuple[float, float], ...]] = {
    "red": ((0.0, 27.0), (300.0, 360.0)),
    "yellow": ((27.0, 90.0),),
    "green": ((90.0, 180.0),),
    "blue": ((180.0, 300.0),),
}
# Minimum component area (pixels on the 32x32 reference canvas) to count as an object; the smallest
# rendered object (a small triangle) covers about 28.
MIN_OBJECT_AREA = 12.0
# Bounding-box side (reference pixels) separating "small" (rendered 8-9.5) from "large" (13-15).
SIZE_THRESHOLD = (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0]) / 2
# Below this template IoU the component is not a recognisable shape at all.
MIN_SHAPE_IOU = 0.55


@dataclass
class DetectedObject:
    """One coloured connected component.

    Geometry is in pixels of the 32x32 reference canvas, whatever the image size.

    Attributes:
        color: colour class.
        area: number of pixels (reference canvas units).
        bbox: ``(x0, y0, x1, y1)``, exclusive upper bounds.
        center: centre of the bounding box ``(x, y)``.
        side: the larger side of the bounding box.
        shape: best-matching template, or ``None`` when no template reaches ``MIN_SHAPE_IOU``.
        shape_iou: IoU of the component with each shape template.
        position: nearest position anchor.
        size: ``"small"`` or ``"large"``.
        mask: the component's boolean mask in image pixels.
    """

    color: str
    area: float
    bbox: tuple[float, float, float, float]
    center: tuple[float, float]
    side: float
    shape: str | None
    shape_iou: dict[str, float]
    position: str
    size: str
    mask: np.ndarray = field(repr=False)


@dataclass
class AdherenceResult:
    """Outcome of :func:`evaluate_adherence`.

    Attributes:
        scores: per-attribute scores in [0, 1]: ``color``, ``shape``, ``count`` always; ``position`` for one
            object; ``relation`` for two; ``size`` when the caption gives a size.
        overall: product of the attribute scores (1.0 iff every attribute is right).
        spec: the scene that was asked for.
        detected: every object found in the image.
        matched: for each requested object, the detected object assigned to it (``None``: not found).
    """

    scores: dict[str, float]
    overall: float
    spec: SceneSpec
    detected: list[DetectedObject]
    matched: list[DetectedObject | None]


def image_to_rgb_array(image: ImageLike) -> np.ndarray:
    """Convert an image to an ``H x W x 3`` float32 array in [0, 1].

    Accepts a PIL image, a uint8 array (``H x W x 3``), a float array in [0, 1] (``H x W x 3``), or a torch
    tensor in [0, 1] shaped ``3 x H x W``, ``1 x 3 x H x W`` or ``H x W x 3`` (e.g. a pipeline's
    ``output_type="pt"`` image).
    """
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    if not isinstance(image, np.ndarray):  # a torch tensor; imported lazily to keep this module numpy-only
        array = image.detach().cpu().float().numpy()
        if array.ndim == 4:
            if array.shape[0] != 1:
                raise ValueError(f"expected a single image, got a batch of shape {tuple(array.shape)}")
            array = array[0]
        if array.ndim == 3 and array.shape[0] == 3 and array.shape[-1] != 3:
            array = array.transpose(1, 2, 0)
        image = array
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an H x W x 3 image, got shape {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def segment_colors(rgb: np.ndarray) -> np.ndarray:
    """Label each pixel with a colour index into :data:`scenes.COLORS`, or -1 for background.

    Args:
        rgb: ``H x W x 3`` float array in [0, 1].
    """
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    chroma = high - low
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    safe_chroma = np.where(chroma > 0, chroma, 1.0)
    # Standard HSV hue, in degrees.
    hue = np.where(
        high == red,
        (60.0 * (green - blue) / safe_chroma) % 360.0,
        np.where(high == green, 60.0 * (blue - red) / safe_chroma + 120.0, 60.0 * (red - green) / safe_chroma + 240.0),
    )
    labels = np.full(rgb.shape[:2], -1, dtype=np.int64)
    coloured = chroma >= MIN_CHROMA
    for index, color in enumerate(COLORS):
        in_sector = np.zeros_like(coloured)
        for start, end in HUE_SECTORS[color]:
            in_sector |= (hue >= start) & (hue < end)
        labels[coloured & in_sector] = index
    return labels


def _connected_components(mask: np.ndarray) -> list[np.ndarray]:
    """8-connected components of a boolean mask, as a list of boolean masks (images are tiny: plain BFS)."""
    height, width = mask.shape
    seen = np.zeros_like(mask, dtype=bool)
    components = []
    for start_y, start_x in zip(*np.nonzero(mask)):
        if seen[start_y, start_x]:
            continue
        component = np.zeros_like(mask, dtype=bool)
        queue = deque([(start_y, start_x)])
        seen[start_y, start_x] = True
        while queue:
            y, x = queue.popleft()
            component[y, x] = True
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        components.append(component)
    return components


def _shape_ious(component: np.ndarray, x0: int, y0: int, x1: int, y1: int) -> dict[str, float]:
    """IoU of a component with each shape template filling the component's bounding box."""
    size = component.shape[0]
    center = ((x0 + x1) / 2, (y0 + y1) / 2)
    ious = {}
    for shape in SHAPES:
        template = shape_coverage(shape, center, x1 - x0, y1 - y0, size) >= 0.5
        union = np.logical_or(template, component).sum()
        ious[shape] = float(np.logical_and(template, component).sum() / union) if union else 0.0
    return ious


def _nearest_position(center: tuple[float, float]) -> str:
    return min(
        POSITION_ANCHORS,
        key=lambda name: (center[0] - POSITION_ANCHORS[name][0]) ** 2 + (center[1] - POSITION_ANCHORS[name][1]) ** 2,
    )


def detect_objects(image: ImageLike, min_area: float = MIN_OBJECT_AREA) -> list[DetectedObject]:
    """Find the coloured objects of an image, largest first.

    Args:
        image: see :func:`image_to_rgb_array`; square images of any size (geometry is rescaled to 32x32).
        min_area: smallest component, in pixels of the 32x32 reference canvas, that counts as an object.
    """
    rgb = image_to_rgb_array(image)
    height, width = rgb.shape[:2]
    if height != width:
        raise ValueError(f"expected a square image, got {width}x{height}")
    scale = REFERENCE_SIZE / width  # image pixels -> reference pixels
    labels = segment_colors(rgb)
    detected = []
    for index, color in enumerate(COLORS):
        for component in _connected_components(labels == index):
            area = float(component.sum()) * scale * scale
            if area < min_area:
                continue
            ys, xs = np.nonzero(component)
            x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
            ious = _shape_ious(component, x0, y0, x1, y1)
            best_shape = max(ious, key=ious.get)
            center = ((x0 + x1) / 2 * scale, (y0 + y1) / 2 * scale)
            side = max(x1 - x0, y1 - y0) * scale
            detected.append(
                DetectedObject(
                    color=color,
                    area=area,
                    bbox=(x0 * scale, y0 * scale, x1 * scale, y1 * scale),
                    center=center,
                    side=side,
                    shape=best_shape if ious[best_shape] >= MIN_SHAPE_IOU else None,
                    shape_iou=ious,
                    position=_nearest_position(center),
                    size="small" if side < SIZE_THRESHOLD else "large",
                    mask=component,
                )
            )
    detected.sort(key=lambda obj: obj.area, reverse=True)
    return detected


def _relation_holds(relation: str, first: DetectedObject, second: DetectedObject) -> bool:
    """Whether ``first`` is ``relation`` ``second``, judged on the dominant axis of their offset."""
    dx = second.center[0] - first.center[0]
    dy = second.center[1] - first.center[1]
    if relation == "above":
        return dy > 0 and abs(dy) >= abs(dx)
    if relation == "below":
        return dy < 0 and abs(dy) >= abs(dx)
    if relation == "left of":
        return dx > 0 and abs(dx) > abs(dy)
    if relation == "right of":
        return dx < 0 and abs(dx) > abs(dy)
    raise ValueError(f"unknown relation {relation!r}")


def evaluate_adherence(
    image: ImageLike, prompt: str | SceneSpec, min_area: float = MIN_OBJECT_AREA
) -> AdherenceResult:
    """Score how well ``image`` shows the scene described by ``prompt``.

    Args:
        image: see :func:`image_to_rgb_array`.
        prompt: a caption of the scene grammar (parsed with :func:`scenes.parse_caption`) or a
            :class:`scenes.SceneSpec`.
        min_area: see :func:`detect_objects`.

    Returns:
        An :class:`AdherenceResult`; ``overall`` is in [0, 1].

    Raises:
        ValueError: if the prompt is not in the scene grammar.
    """
    spec = parse_caption(prompt) if isinstance(prompt, str) else prompt
    detected = detect_objects(image, min_area=min_area)

    # Assign each requested object a detected object of its colour: the largest unused one, preferring one
    # of the requested shape (matters only when two requested objects share a colour).
    used: set[int] = set()
    matched: list[DetectedObject | None] = []
    for obj in spec.objects:
        candidates = [i for i, det in enumerate(detected) if det.color == obj.color and i not in used]
        if not candidates:
            matched.append(None)
            continue
        best = min(candidates, key=lambda i: (detected[i].shape != obj.shape, -detected[i].area))
        used.add(best)
        matched.append(detected[best])

    count = len(spec.objects)
    scores: dict[str, float] = {
        "color": sum(det is not None for det in matched) / count,
        "shape": sum(det is not None and det.shape == obj.shape for obj, det in zip(spec.objects, matched)) / count,
    }
    sized = [(obj, det) for obj, det in zip(spec.objects, matched) if obj.size is not None]
    if sized:
        scores["size"] = sum(det is not None and det.size == obj.size for obj, det in sized) / len(sized)
    if spec.relation is None:
        det = matched[0]
        scores["position"] = float(det is not None and det.position == spec.objects[0].position)
    else:
        first, second = matched
        scores["relation"] = float(
            first is not None and second is not None and _relation_holds(spec.relation, first, second)
        )
    scores["count"] = float(len(detected) == count)
    overall = float(np.prod(list(scores.values())))
    return AdherenceResult(scores=scores, overall=overall, spec=spec, detected=detected, matched=matched)


def summarize_adherence(results: Sequence[AdherenceResult] | Iterable[AdherenceResult]) -> dict[str, float]:
    """Means over many results: ``overall`` and every attribute score (over the results that have it)."""
    results = list(results)
    if not results:
        raise ValueError("no results to summarize")
    summary = {"overall": float(np.mean([r.overall for r in results])), "num_images": float(len(results))}
    attributes = sorted({name for r in results for name in r.scores})
    for name in attributes:
        values = [r.scores[name] for r in results if name in r.scores]
        summary[name] = float(np.mean(values))
    return summary
