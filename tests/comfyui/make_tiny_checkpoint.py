"""Write a tiny SD1.5-like checkpoint (random weights) that ComfyUI's CheckpointLoaderSimple loads as SD15.

Run with ComfyUI's python and ComfyUI on sys.path (the opt-in tests do this):
    $COMFYUI_PYTHON tests/comfyui/make_tiny_checkpoint.py OUT.safetensors

* UNet: ComfyUI's own ``UNetModel`` with SD1.5's widths where detection needs them (model_channels 320,
  context 768, 8 heads) but two levels of one res block each: 7 transformer blocks, ~20M parameters.
* Text encoder: a full-size CLIP-L (ComfyUI builds SD1.5's fixed config whatever the file holds), random
  weights from ``transformers``' own initialisation, stored fp16.
* VAE: TAESD (ComfyUI recognises ``taesd_decoder.*``), random weights: images are noise, but finite.
"""
from __future__ import annotations

import sys

import torch

TINY_UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "channel_mult": [1, 1], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8, "num_head_channels": -1,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _randomise(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Finite random weights for modules built with ComfyUI's no-init ops (their storage is uninitialised)."""
    out = {}
    for name, tensor in module.state_dict().items():
        if name.endswith(".weight") and tensor.dim() == 1:  # GroupNorm/LayerNorm scales
            out[name] = torch.ones_like(tensor)
        elif name.endswith(".bias"):
            out[name] = torch.zeros_like(tensor)
        else:
            fan_in = tensor[0].numel() if tensor.dim() > 1 else 1
            out[name] = torch.randn(tensor.shape, generator=generator) / max(fan_in, 1) ** 0.5
    return out


def make_tiny_checkpoint(path: str, seed: int = 0) -> None:
    import comfy.options

    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args

    args.cpu = True  # must be set before comfy.model_management is imported (it probes the GPU at import)
    import comfy.ops
    import comfy.taesd.taesd
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from safetensors.torch import save_file
    from transformers import CLIPTextConfig, CLIPTextModel

    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    unet = UNetModel(**TINY_UNET_CONFIG, operations=comfy.ops.disable_weight_init)
    for k, v in _randomise(unet, generator).items():
        tensors[f"model.diffusion_model.{k}"] = v.contiguous()

    torch.manual_seed(seed)
    clip_config = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                 num_hidden_layers=12, max_position_embeddings=77, vocab_size=49408,
                                 projection_dim=768, hidden_act="quick_gelu")
    clip = CLIPTextModel(clip_config)
    for k, v in clip.state_dict().items():
        if k.endswith("position_ids"):
            continue
        tensors[f"cond_stage_model.transformer.{k}"] = v.to(torch.float16).contiguous()

    taesd = comfy.taesd.taesd.TAESD()
    for k, v in _randomise(taesd, generator).items():
        if k in ("vae_scale", "vae_shift"):
            v = torch.tensor(1.0) if k == "vae_scale" else torch.tensor(0.0)
        tensors[f"first_stage_model.{k}"] = v.contiguous()
    save_file(tensors, path)


if __name__ == "__main__":
    make_tiny_checkpoint(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
