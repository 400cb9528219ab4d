"""The layout of a SlimDiff Hub repository (and of ``OUT/pipeline`` written by ``slimdiff slim``).

A pipeline repository is the diffusers folder (``model_index.json`` + one folder per component) plus:

    README.md                     the model card (:mod:`slimdiff_diffusers.hub.card`)
    images/before_after.png       original vs slim samples on held-out prompts (when measured)
    images/rank_allocation.png    the kept rank of every group
    slim_unet.safetensors         the slim denoiser as one file, for ComfyUI's "SlimDiff Load Slim Model"

diffusers' ``DiffusionPipeline.from_pretrained`` downloads only the component folders and configs, so the extra
files cost a pipeline user nothing. A model repository (``slim_unet.push_to_hub``) has the same extras next to
the model's ``config.json`` and weights.
"""
from __future__ import annotations

CARD_NAME = "README.md"
IMAGES_DIR = "images"
GRID_IMAGE = f"{IMAGES_DIR}/before_after.png"
RANKS_IMAGE = f"{IMAGES_DIR}/rank_allocation.png"
SINGLE_FILE_NAME = "slim_unet.safetensors"
COMFYUI_MODELS_SUBFOLDER = "slim_models"  # ComfyUI/models/<this>: where the Load Slim Model node lists files

__all__ = ["CARD_NAME", "COMFYUI_MODELS_SUBFOLDER", "GRID_IMAGE", "IMAGES_DIR", "RANKS_IMAGE", "SINGLE_FILE_NAME"]
