"""The embedded default model: a tiny Stable-Diffusion-architecture text-to-image pipeline, trained here.

It draws the procedural scenes of :mod:`slimdiff_diffusers.evaluation.scenes` ("a large red circle on the
left", "a blue square above a yellow triangle") at 32x32. It is a stock diffusers ``StableDiffusionPipeline``
(``UNet2DConditionModel`` with cross-attention transformer blocks, ``CLIPTextModel`` + ``CLIPTokenizer``,
``AutoencoderKL``, ``DDIMScheduler``) saved with ``save_pretrained`` under :data:`DEFAULT_MODEL_DIR`, so it
loads offline with ``StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR)``.

See ``docs/default_model.md`` (model card) and ``scripts/train_default_model.py`` (how it was trained).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .prompts import CALIBRATION_PROMPTS, HELDOUT_PROMPTS

if TYPE_CHECKING:  # diffusers is imported lazily: importing this package stays cheap
    from diffusers import StableDiffusionPipeline

__all__ = ["DEFAULT_MODEL_DIR", "load_default_pipeline", "HELDOUT_PROMPTS", "CALIBRATION_PROMPTS"]

DEFAULT_MODEL_DIR: Path = Path(__file__).resolve().parent / "pipeline"


def load_default_pipeline(
    torch_dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", progress_bar: bool = False
) -> "StableDiffusionPipeline":
    """Load the embedded default pipeline offline, every component cast to ``torch_dtype``.

    Args:
        torch_dtype: dtype of every component after loading.
        device: where to put the pipeline.
        progress_bar: show diffusers' per-step progress bar when generating.

    Returns:
        A ``StableDiffusionPipeline`` with a ``DDIMScheduler``; ``pipe("a red circle on the left")``
        generates a 32x32 image.
    """
    from diffusers import StableDiffusionPipeline

    if not (DEFAULT_MODEL_DIR / "model_index.json").is_file():
        raise FileNotFoundError(
            f"the default model is missing at {DEFAULT_MODEL_DIR}; train it with scripts/train_default_model.py"
        )
    # diffusers 0.42 names the argument ``dtype`` (``torch_dtype`` is deprecated there).
    pipe = StableDiffusionPipeline.from_pretrained(DEFAULT_MODEL_DIR, dtype=torch_dtype, local_files_only=True)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)
