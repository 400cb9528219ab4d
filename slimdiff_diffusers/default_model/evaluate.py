"""Generate images with a scene-grammar pipeline and measure their prompt adherence."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..evaluation.adherence import AdherenceResult, evaluate_adherence, summarize_adherence

__all__ = ["pipeline_call_kwargs", "generate_images", "measure_adherence"]


def pipeline_call_kwargs(pipe, guidance_scale: float, batch_size: int) -> dict:
    """The call arguments that ask ``pipe`` for classifier-free guidance ``guidance_scale`` at its trained size.

    * UNet pipelines (Stable Diffusion): ``guidance_scale``.
    * ``FluxPipeline``: the image size of its VAE's ``sample_size`` and the T5 length of its tokenizer's
      ``model_max_length`` (``flux-tiny``: 32x32 and 16 tokens; FluxPipeline's own defaults are 256x256
      and 512 tokens), and guidance through the
      transformer's distilled guidance embedding when it has one (``guidance_embeds``, FLUX.1-dev), else true
      classifier-free guidance (``true_cfg_scale`` with an empty negative prompt, as ``flux-tiny`` was trained
      with 10% empty captions). Guidance 1 runs the conditional prediction alone.
    """
    if getattr(pipe, "transformer", None) is None or getattr(pipe, "text_encoder_2", None) is None:
        return {"guidance_scale": guidance_scale}
    kwargs: dict = {}
    sample_size = getattr(pipe.vae.config, "sample_size", None)
    if isinstance(sample_size, int):  # the VAE's image size (FluxPipeline's default is 128 x vae factor)
        kwargs.update(height=sample_size, width=sample_size)
    tokenizer_length = getattr(pipe.tokenizer_2, "model_max_length", 512)
    if tokenizer_length <= 512:  # the T5 length a small model was trained with (FluxPipeline pads to 512)
        kwargs["max_sequence_length"] = tokenizer_length
    if pipe.transformer.config.get("guidance_embeds", False):
        kwargs["guidance_scale"] = guidance_scale
    elif guidance_scale > 1.0:
        kwargs.update(true_cfg_scale=guidance_scale, negative_prompt=[""] * batch_size)
    return kwargs


@torch.no_grad()
def generate_images(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    num_inference_steps: int = 25,
    guidance_scale: float = 7.5,
    batch_size: int = 32,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair with a Stable Diffusion or Flux pipeline.

    ``guidance_scale`` is translated for the pipeline by :func:`pipeline_call_kwargs`.

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
            output_type="np",
            **pipeline_call_kwargs(pipe, guidance_scale, len(batch_prompts)),
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
