"""Generate images with a scene-grammar pipeline and measure their prompt adherence."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from ..evaluation.adherence import AdherenceResult, evaluate_adherence, summarize_adherence

__all__ = ["pipeline_call_kwargs", "generate_images", "measure_adherence"]

if TYPE_CHECKING:
    from . import EmbeddedModel

DEFAULT_STEPS = 25  # a pipeline that is not an embedded model: the steps the embedded models were trained for


def _embedded_entry(pipe, model: "EmbeddedModel | str | None") -> "EmbeddedModel | None":
    """The registry entry that drives ``pipe``: ``model`` by entry or name, else the one ``pipe`` was loaded from."""
    from . import EmbeddedModel, embedded_model_of, get_embedded_model

    if isinstance(model, EmbeddedModel):
        return model
    if model is not None:
        return get_embedded_model(model)
    return embedded_model_of(pipe)


def pipeline_call_kwargs(pipe, guidance_scale: float | None, batch_size: int,
                         model: "EmbeddedModel | str | None" = None) -> dict:
    """The call arguments that ask ``pipe`` for guidance ``guidance_scale`` at its trained size, for a batch of
    ``batch_size`` prompts (everything but the prompt, the generator, the steps and the output type).

    * An embedded model (``model``, by name or entry; or the pipeline was loaded from an embedded model's folder,
      :func:`~slimdiff_diffusers.default_model.embedded_model_of`): its registry entry decides, the one owner of
      its sampler (:meth:`~slimdiff_diffusers.default_model.EmbeddedModel.guidance_kwargs` and ``call_kwargs``):
      ``sd-tiny`` gets ``guidance_scale``; ``flux-tiny`` true CFG (``true_cfg_scale`` with one empty negative
      prompt per prompt) at 32x32 and 16 T5 tokens. ``guidance_scale`` ``None``: the trained scale.
    * Any other pipeline (a user's, or an embedded folder copied or retrained elsewhere): inferred from its
      structure, since no registry entry speaks for it. UNet pipelines (Stable Diffusion): ``guidance_scale``.
      A ``FluxPipeline``: the image size of its VAE's ``sample_size`` and the T5 length of its tokenizer's
      ``model_max_length`` when at most 512 (FluxPipeline's own defaults are 256x256 and 512 tokens), and guidance
      through the transformer's distilled guidance embedding when it has one (``guidance_embeds``, FLUX.1-dev),
      else true classifier-free guidance (``true_cfg_scale`` with an empty negative prompt). ``guidance_scale``
      ``None``: the pipeline's own default (its ``__call__`` signature).

    Guidance 1 runs the conditional prediction alone.
    """
    embedded = _embedded_entry(pipe, model)
    if embedded is not None:
        return embedded.guidance_kwargs(guidance_scale, batch_size) | dict(embedded.call_kwargs)
    if guidance_scale is None:
        from ..diffusers_adapter.pipeline import default_guidance_scale

        guidance_scale = default_guidance_scale(pipe)
    return _inferred_call_kwargs(pipe, guidance_scale, batch_size)


def _inferred_call_kwargs(pipe, guidance_scale: float, batch_size: int) -> dict:
    """:func:`pipeline_call_kwargs` for a pipeline no registry entry speaks for: read from its structure."""
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
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 32,
    model: "EmbeddedModel | str | None" = None,
) -> np.ndarray:
    """Generate one image per (prompt, seed) pair with a Stable Diffusion or Flux pipeline.

    The pipeline-call arguments come from :func:`pipeline_call_kwargs` (an embedded model's registry entry, named
    by ``model`` or found from the folder ``pipe`` was loaded from; else the pipeline's structure).
    ``num_inference_steps`` / ``guidance_scale`` ``None``: the embedded model's trained values (25 steps and the
    pipeline's own guidance default for other pipelines).

    Each image has its own ``torch.Generator`` seeded with its seed, so an image does not depend on the
    batch it was generated in.

    Returns:
        ``N x H x W x 3`` uint8 array.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    from ..diffusers_adapter.pipeline import resolve_resolution_binning

    embedded = _embedded_entry(pipe, model)
    if num_inference_steps is None:
        num_inference_steps = embedded.num_inference_steps if embedded is not None else DEFAULT_STEPS
    # a PixArt without aspect-ratio bins for its sample_size: binning off, said once (nothing for other pipelines)
    binning = resolve_resolution_binning(pipe)
    images = []
    for start in range(0, len(prompts), batch_size):
        batch_prompts = list(prompts[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(int(seed)) for seed in seeds[start : start + batch_size]]
        output = pipe(
            prompt=batch_prompts,
            generator=generators,
            num_inference_steps=num_inference_steps,
            output_type="np",
            **pipeline_call_kwargs(pipe, guidance_scale, len(batch_prompts), model=embedded),
            **binning,
        )
        images.append(np.clip(np.rint(output.images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(images, axis=0)


def measure_adherence(
    pipe,
    prompts: Sequence[str],
    images_per_prompt: int = 4,
    seed: int = 0,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    batch_size: int = 32,
    model: "EmbeddedModel | str | None" = None,
) -> tuple[dict[str, float], list[AdherenceResult], np.ndarray]:
    """Generate ``images_per_prompt`` images for every prompt and score them with :func:`evaluate_adherence`.

    Image ``j`` of prompt ``i`` uses seed ``seed + i * images_per_prompt + j``. The sampler is the embedded
    model's (``model``, or the one ``pipe`` was loaded from) unless given; see :func:`generate_images`.

    Returns:
        ``(summary, results, images)``: the means of :func:`summarize_adherence` (plus ``overall_single`` and
        ``overall_pair`` for one- and two-object prompts), the per-image results, and the images.
    """
    expanded_prompts = [prompt for prompt in prompts for _ in range(images_per_prompt)]
    seeds = [seed + i for i in range(len(expanded_prompts))]
    images = generate_images(pipe, expanded_prompts, seeds, num_inference_steps, guidance_scale, batch_size, model)
    results = [evaluate_adherence(image, prompt) for image, prompt in zip(images, expanded_prompts)]
    summary = summarize_adherence(results)
    for name, keep in (("single", lambda r: r.spec.relation is None), ("pair", lambda r: r.spec.relation is not None)):
        subset = [r.overall for r in results if keep(r)]
        if subset:
            summary[f"overall_{name}"] = float(np.mean(subset))
    return summary, results, images
