"""Evaluation helpers: procedural captioned scenes, an automatic prompt-adherence metric, image metrics."""
from .adherence import (
    AdherenceResult,
    DetectedObject,
    detect_objects,
    evaluate_adherence,
    image_to_rgb_array,
    segment_colors,
    summarize_adherence,
)
from .image_metrics import psnr, relative_error, ssim
from .scenes import (
    COLORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    PlacedObject,
    SceneObject,
    SceneSpec,
    all_captions,
    all_scene_specs,
    caption_scene,
    parse_caption,
    place_objects,
    render_dataset,
    render_placements,
    render_scene,
    sample_scene_spec,
)

__all__ = [
    # adherence.py
    "AdherenceResult",
    "DetectedObject",
    "detect_objects",
    "evaluate_adherence",
    "image_to_rgb_array",
    "segment_colors",
    "summarize_adherence",
    # scenes.py
    "COLORS",
    "POSITIONS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "PlacedObject",
    "SceneObject",
    "SceneSpec",
    "all_captions",
    "all_scene_specs",
    "caption_scene",
    "parse_caption",
    "place_objects",
    "render_dataset",
    "render_placements",
    "render_scene",
    "sample_scene_spec",
    # image_metrics.py
    "psnr",
    "relative_error",
    "ssim",
]
