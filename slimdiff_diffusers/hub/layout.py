"""The layout of a SlimDiff Hub repository (and of ``OUT/pipeline`` written by ``slimdiff slim``).

A pipeline repository is the diffusers folder (``model_index.json`` + one folder per component) plus:

    README.md                     the model card (:mod:`slimdiff_diffusers.hub.card`)
    images/before_after.png       original vs slim samples on held-out prompts (when measured)
    images/rank_allocation.png    the kept rank of every group
    slim_unet.safetensors         the slim UNet as one file, for ComfyUI's "SlimDiff Load Slim Model"
    slim_transformer.safetensors  (transformer pipelines: Flux, SD3, PixArt) the slim transformer as one file,
                                  for ``slimdiff_diffusers.load_slim_model_file``

diffusers' ``DiffusionPipeline.from_pretrained`` downloads only the component folders and configs, so the extra
files cost a pipeline user nothing. A model repository (``slim_unet.push_to_hub``) has the same extras next to
the model's ``config.json`` and weights.
"""
from __future__ import annotations

CARD_NAME = "README.md"
IMAGES_DIR = "images"
GRID_IMAGE = f"{IMAGES_DIR}/before_after.png"
RANKS_IMAGE = f"{IMAGES_DIR}/rank_allocation.png"
SINGLE_FILE_NAME = "slim_unet.safetensors"  # a UNet's; see single_file_name
SINGLE_FILE_NAMES = {"unet": SINGLE_FILE_NAME, "transformer": "slim_transformer.safetensors"}
COMFYUI_MODELS_SUBFOLDER = "slim_models"  # ComfyUI/models/<this>: where the Load Slim Model node lists files



def single_file_name(denoiser_name: str) -> str:
    """The single file's name for the pipeline component ``denoiser_name`` (``unet`` or ``transformer``)."""
    return SINGLE_FILE_NAMES.get(denoiser_name, f"slim_{denoiser_name}.safetensors")


__all__ = ["CARD_NAME", "COMFYUI_MODELS_SUBFOLDER", "GRID_IMAGE", "IMAGES_DIR", "RANKS_IMAGE", "SINGLE_FILE_NAME",
           "SINGLE_FILE_NAMES", "single_file_name"]
