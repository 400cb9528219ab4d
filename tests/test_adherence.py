"""The scene generator and the prompt-adherence metric on renders with known content.

The metric must pass right renders and fail wrong ones: wrong colour, position, shape, size, relation,
an extra object, or a blank background.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from slimdiff_diffusers.evaluation.adherence import (
    detect_objects,
    evaluate_adherence,
    image_to_rgb_array,
    summarize_adherence,
)
from slimdiff_diffusers.evaluation.scenes import (
    COLORS,
    POSITIONS,
    SHAPES,
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

OPPOSITE_RELATION = {"above": "below", "below": "above", "left of": "right of", "right of": "left of"}


def _next(values: tuple[str, ...], value: str, offset: int = 1) -> str:
    return values[(values.index(value) + offset) % len(values)]


# ---------------------------------------------------------------------------------------------------------
# Scene grammar
# ---------------------------------------------------------------------------------------------------------
def test_grammar_size_and_caption_round_trip():
    specs = all_scene_specs()
    captions = all_captions()
    assert len(specs) == 552 and len(set(captions)) == 552
    for spec, caption in zip(specs, captions):
        assert parse_caption(caption) == spec
        assert caption_scene(parse_caption(caption)) == caption
    assert parse_caption("  A LARGE red  circle on the left. ") == parse_caption("a large red circle on the left")


@pytest.mark.parametrize(
    "caption", ["a red circle", "a purple circle on the left", "a large red circle above", "", "two red circles"]
)
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError):
        parse_caption(caption)


def test_invalid_specs_are_rejected():
    with pytest.raises(ValueError):
        SceneObject("hexagon", "red")
    with pytest.raises(ValueError):
        SceneSpec(objects=(SceneObject("circle", "red"),))  # one object needs a position
    with pytest.raises(ValueError):
        SceneSpec(objects=(SceneObject("circle", "red"), SceneObject("square", "blue")))  # no relation


def test_rendering_is_deterministic_given_the_seed():
    spec = parse_caption("a blue square above a yellow triangle")
    first = np.asarray(render_scene(spec, 123))
    assert first.shape == (32, 32, 3) and first.dtype == np.uint8
    assert np.array_equal(first, np.asarray(render_scene(spec, 123)))
    assert not np.array_equal(first, np.asarray(render_scene(spec, 124)))
    assert sample_scene_spec(7) == sample_scene_spec(7)
    images_a, captions_a = render_dataset(20, seed=3)
    images_b, captions_b = render_dataset(20, seed=3)
    assert captions_a == captions_b and np.array_equal(images_a, images_b)


def test_render_dataset_excludes_captions():
    excluded = all_captions()[:300]
    _, captions = render_dataset(200, seed=0, exclude_captions=excluded)
    assert not set(captions) & set(excluded)


# ---------------------------------------------------------------------------------------------------------
# Right renders score high
# ---------------------------------------------------------------------------------------------------------
def test_every_scene_of_the_grammar_scores_one_when_rendered():
    rng = np.random.default_rng(0)
    results = [evaluate_adherence(render_scene(spec, rng), spec) for spec in all_scene_specs()]
    summary = summarize_adherence(results)
    assert summary["overall"] == 1.0, [caption_scene(r.spec) for r in results if r.overall < 1.0]
    assert all(summary[name] == 1.0 for name in ("color", "shape", "size", "position", "relation", "count"))


@pytest.mark.parametrize("image_size", [32, 64])
def test_input_formats_and_sizes(image_size):
    caption = "a large green triangle at the bottom"
    image = render_scene(parse_caption(caption), 5, image_size=image_size)
    array = np.array(image)  # a writable copy
    tensor = torch.from_numpy(array).permute(2, 0, 1).float() / 255.0
    for candidate in (image, array, array.astype(np.float32) / 255.0, tensor, tensor[None]):
        result = evaluate_adherence(candidate, caption)
        assert result.overall == 1.0, result.scores
    assert np.allclose(image_to_rgb_array(tensor), image_to_rgb_array(image), atol=1e-6)
    (detected,) = detect_objects(image)
    found = (detected.color, detected.shape, detected.size, detected.position)
    assert found == ("green", "triangle", "large", "bottom")


# ---------------------------------------------------------------------------------------------------------
# Wrong renders score low
# ---------------------------------------------------------------------------------------------------------
SINGLE_SPECS = [spec for spec in all_scene_specs() if spec.relation is None][::7]
PAIR_SPECS = [spec for spec in all_scene_specs() if spec.relation is not None][::23]


@pytest.mark.parametrize("spec", SINGLE_SPECS, ids=caption_scene)
def test_single_object_mismatches_score_zero(spec):
    image = render_scene(spec, 11)
    (obj,) = spec.objects
    assert evaluate_adherence(image, spec).overall == 1.0
    wrong = {
        "color": dataclasses.replace(obj, color=_next(COLORS, obj.color)),
        "position": dataclasses.replace(obj, position=_next(POSITIONS, obj.position)),
        "shape": dataclasses.replace(obj, shape=_next(SHAPES, obj.shape)),
        "size": dataclasses.replace(obj, size="small" if obj.size == "large" else "large"),
    }
    for attribute, wrong_obj in wrong.items():
        result = evaluate_adherence(image, SceneSpec(objects=(wrong_obj,)))
        assert result.overall == 0.0, (attribute, result.scores)
        assert result.scores[attribute] == 0.0
        # Only the changed attribute fails (a wrong colour also leaves nothing to judge the others on).
        if attribute != "color":
            assert all(v == 1.0 for k, v in result.scores.items() if k != attribute), result.scores


@pytest.mark.parametrize("spec", PAIR_SPECS, ids=caption_scene)
def test_two_object_mismatches_score_low(spec):
    image = render_scene(spec, 12)
    assert evaluate_adherence(image, spec).overall == 1.0
    flipped = SceneSpec(objects=spec.objects, relation=OPPOSITE_RELATION[spec.relation])
    assert evaluate_adherence(image, flipped).scores["relation"] == 0.0
    assert evaluate_adherence(image, flipped).overall == 0.0
    # The two objects swapped: the relation no longer holds.
    swapped = SceneSpec(objects=spec.objects[::-1], relation=spec.relation)
    assert evaluate_adherence(image, swapped).overall == 0.0
    # One object of a colour that is not in the image.
    first, second = spec.objects
    missing = next(c for c in COLORS if c not in (first.color, second.color))
    wrong_color = SceneSpec(objects=(dataclasses.replace(first, color=missing), second), relation=spec.relation)
    assert evaluate_adherence(image, wrong_color).overall <= 0.5
    assert evaluate_adherence(image, wrong_color).scores["color"] == 0.5


def test_blank_and_noise_images_score_zero():
    for spec in SINGLE_SPECS[:5] + PAIR_SPECS[:5]:
        blank = render_placements([], rng=3)
        result = evaluate_adherence(blank, spec)
        assert result.overall == 0.0 and result.detected == []
        assert result.scores["color"] == 0.0
    noise = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert evaluate_adherence(noise, "a small red circle on the left").overall == 0.0


def test_an_extra_object_fails_the_count():
    spec = parse_caption("a small red circle on the left")
    placed = place_objects(spec, 4) + [PlacedObject("square", (45, 85, 220), (23.0, 16.0), 9.0)]
    image = render_placements(placed, rng=4)
    result = evaluate_adherence(image, spec)
    assert result.scores["count"] == 0.0 and result.overall == 0.0
    assert all(v == 1.0 for k, v in result.scores.items() if k != "count")


def test_a_blob_is_not_a_shape():
    """A thin diagonal streak of the right colour at the right place is not a circle."""
    image = np.full((32, 32, 3), 100, dtype=np.uint8)
    for i in range(4, 14):
        image[12 + i - 4, i : i + 2] = (215, 45, 40)
    result = evaluate_adherence(image, "a small red circle on the left")
    assert result.scores["shape"] == 0.0 and result.overall == 0.0
