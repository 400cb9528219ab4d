"""Generate images with a scene-grammar pipeline and measure their prompt adherence."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..evaluation.adherence import AdherenceResult, evaluate_adherence, summarize_adherence

__all__ = ["generate_images", "measure_adherence"]


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 32,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair with a ``StableDiffusionPipeline``.

    Each image has its own ``torch.Generator`` seeded with its seed, so an image does not depend on the
    batch it was generated in.

    Returns:
        ``N x H x W x 3`` uint8 array.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    images = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        output = pipe(
            prompt=batch_prompts,
            generator=generators,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            output_type="np",
        )
        images.append(np.clip(np.rint(output.images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(images, axis=0)


def measure_adherence(
    pipe,
    prompts: Sequence[str],
    images_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 32,
) -> tuple[dict[str, float], list[AdherenceResult], np.ndarray]:
    """Generate ``images_per_prompt`` images for every prompt and score them with :func:`evaluate_adherence`.

    Image ``j`` of prompt ``i`` uses seed ``seed + i * images_per_prompt + j``.

    Returns:
        ``(summary, results, images)``: the means of :func:`summarize_adherence` (plus ``overall_single`` and
        ``overall_pair`` for one- and two-object prompts), the per-image results, and the images.
    """
    expanded_prompts = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(expanded_prompts))]
    images = generate_images(pipe, expanded_prompts, seeds, num_inference_steps, guidance_scale, batch_size)
    results = [evaluate_adherence(image, prompt) for image, prompt in zip(images, expanded_prompts)]
    summary = summarize_adherence(results)
    for name, keep in (("single", lambda r: r.spec.relation is None), ("pair", lambda r: r.spec.relation is not None)):
        subset = [r.overall for r in results if keep(r)]
        if subset:
            summary[f"overall_{name}"] = float(np.mean(subset))
    return summary, results, images
