"""Tiny, randomly initialised diffusers models with the real SD1.5 / SDXL block structure (fast on CPU).

Random weights exercise shapes and exactness (full-rank reproduction, save/load); quality claims are tested on
the trained models (anime64, the embedded default model).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer


def tiny_sd15_unet(seed: int = 0) -> UNet2DConditionModel:
    """SD1.5 layout: CrossAttn down/up blocks + cross-attention mid block, GEGLU FFN, 2 heads of width 8."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8,
    ).eval()


def tiny_sdxl_unet(seed: int = 0) -> UNet2DConditionModel:
    """SDXL layout: linear proj_in, several transformer layers per block, text_time added conditioning."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=24, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=8 * 6 + 12, norm_num_groups=8,
    ).eval()


def sdxl_added_cond(batch: int) -> dict:
    return {"text_embeds": torch.randn(batch, 12), "time_ids": torch.randn(batch, 6)}


def write_char_tokenizer(folder: Path) -> CLIPTokenizer:
    """A CLIP tokenizer whose tokens are single characters (no merges): enough for real tokenisation paths."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = "abcdefghijklmnopqrstuvwxyz0123456789,.-'"
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def tiny_sd_pipeline(tmp: Path, seed: int = 0) -> StableDiffusionPipeline:
    """A complete StableDiffusionPipeline (tokenizer, text encoder, tiny SD1.5 UNet, tiny VAE, DDIM)."""
    tokenizer = write_char_tokenizer(tmp / "tokenizer_files")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=24, intermediate_size=48,
                                                num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                bos_token_id=0, eos_token_id=1, pad_token_id=1)).eval()
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), block_out_channels=(8, 8),
                        latent_channels=4, norm_num_groups=4, sample_size=16).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                              beta_end=0.012, clip_sample=False, set_alpha_to_one=False)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_sd15_unet(seed),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# --- Transformer denoisers (issue 10) ----------------------------------------------------------------------
# Tiny configurations of diffusers' DiT families with the real block structure: Flux (double + single stream,
# RoPE, RMS QK-norm, optional guidance embedding), SD3 (joint blocks, `context_pre_only` last block, optional
# RMS QK-norm) and PixArt (BasicTransformerBlock with ada_norm_single, tanh-GELU FFN). Each comes with a helper
# that returns valid keyword arguments for one forward call; a forward takes milliseconds on CPU.

def tiny_flux_transformer(seed: int = 0, guidance_embeds: bool = False, num_layers: int = 2,
                          num_single_layers: int = 2):
    """Flux.1 layout: `num_layers` double-stream + `num_single_layers` single-stream blocks, 2 heads of width 8,
    3-axis RoPE (2+2+4 = 8) and RMS QK-norm; `guidance_embeds=True` gives the Flux.1-dev guidance embedding."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=8, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12, pooled_projection_dim=10,
        guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    ).eval()


def flux_inputs(model, batch: int = 2, height: int = 4, width: int = 4, text_len: int = 5, seed: int = 0) -> dict:
    """Keyword arguments for one FluxTransformer2DModel forward: packed latents (batch, h*w, in_channels), text
    tokens, pooled text, `timestep` in [0, 1] as the Flux pipeline passes it, ids, and `guidance` when embedded."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    img_ids = torch.zeros(height, width, 3)
    img_ids[..., 1] = torch.arange(height)[:, None]
    img_ids[..., 2] = torch.arange(width)[None, :]
    kwargs = {
        "hidden_states": torch.randn(batch, height * width, cfg.in_channels, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g),
        "img_ids": img_ids.reshape(-1, 3),
        "txt_ids": torch.zeros(text_len, 3),
        "return_dict": False,
    }
    if cfg.guidance_embeds:
        kwargs["guidance"] = torch.full((batch,), 3.5)
    return kwargs


def tiny_sd3_transformer(seed: int = 0, qk_norm: str | None = None, num_layers: int = 3):
    """SD3 layout: `num_layers` JointTransformerBlocks, the last one `context_pre_only` (no text FFN, no
    `to_add_out`, returns None for the text stream), 2 heads of width 8; `qk_norm="rms_norm"` is SD3.5's."""
    from diffusers import SD3Transformer2DModel
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=num_layers, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, pooled_projection_dim=10,
        out_channels=4, pos_embed_max_size=8, qk_norm=qk_norm,
    ).eval()


def sd3_inputs(model, batch: int = 2, text_len: int = 5, seed: int = 0) -> dict:
    """Keyword arguments for one SD3Transformer2DModel forward (latents, text, pooled text, timestep in [0, 1000))."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.joint_attention_dim, generator=g),
        "pooled_projections": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
        "timestep": torch.rand(batch, generator=g) * 1000,
        "return_dict": False,
    }


def tiny_pixart_transformer(seed: int = 0, num_layers: int = 2, sample_size: int = 8):
    """PixArt-Σ layout: BasicTransformerBlocks with ada_norm_single, self + cross attention, tanh-GELU FFN, caption
    projection; 2 heads of width 8. ``sample_size=32`` is the 256-pixel PixArt's (the pipelines' resolution
    binning knows only the real sample sizes)."""
    from diffusers import PixArtTransformer2DModel
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=16, sample_size=sample_size, patch_size=2, caption_channels=12, norm_num_groups=4,
    ).eval()


def pixart_inputs(model, batch: int = 2, text_len: int = 5, seed: int = 0) -> dict:
    """Keyword arguments for one PixArtTransformer2DModel forward (Sigma: no additional resolution conditions)."""
    g = torch.Generator().manual_seed(seed)
    cfg = model.config
    return {
        "hidden_states": torch.randn(batch, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g),
        "encoder_hidden_states": torch.randn(batch, text_len, cfg.caption_channels, generator=g),
        "timestep": torch.randint(0, 1000, (batch,), generator=g),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "return_dict": False,
    }


def tiny_unet_eps(unet) -> torch.Tensor:
    """The noise prediction of a tiny SD UNet (:func:`tiny_sd15_unet` widths) on fixed seeded inputs."""
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 24, generator=gen)
    with torch.no_grad():
        return unet(x, 500, encoder_hidden_states=ctx).sample


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return ((a - b).norm() / b.norm()).item()


class NegativeBranchRecorder:
    """Records, for each denoiser call made inside ``pipeline_class.__call__`` (not the propagation probe's
    replays), whether it ran the empty negative prompt, whose text states are the same for every row.

    Patch ``pipeline_class.__call__`` with :attr:`patched_call` (it keeps the signature, which the calibration
    checks call arguments against) and register :meth:`pre_hook` on the denoiser with ``with_kwargs=True``.
    """

    def __init__(self, pipeline_class: type):
        import functools

        self.real_call = pipeline_class.__call__
        self.negative_branch: list[bool] = []
        self._inside = False

        @functools.wraps(self.real_call)
        def patched_call(pipe, *args, **kwargs):
            self._inside = True
            try:
                return self.real_call(pipe, *args, **kwargs)
            finally:
                self._inside = False
        self.patched_call = patched_call

    def pre_hook(self, _module, _args, kwargs) -> None:
        if self._inside:
            states = kwargs["encoder_hidden_states"]
            self.negative_branch.append(bool(torch.equal(states, states[:1].expand_as(states))))


def fused_lora_copy(donor):
    """A copy of ``donor`` (a model carrying one LoRA, e.g. from :func:`random_lora`) with the LoRA merged into its
    weights and the adapter layers removed: diffusers' fuse_lora + unload_lora, or PEFT's merge for a class
    without diffusers' adapter API."""
    import copy

    from peft.tuners.tuners_utils import BaseTunerLayer

    fused = copy.deepcopy(donor)
    if hasattr(fused, "fuse_lora"):
        fused.fuse_lora()
        fused.unload_lora()
        return fused
    for name, module in list(fused.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            fused.set_submodule(name, module.get_base_layer())
    return fused


def random_lora(model, targets, seed: int = 1, std: float = 0.1, **config):
    """``(donor, PEFT state dict, LoraConfig)``: a copy of ``model`` with a rank-4 LoRA on ``targets`` whose factors
    are all random (``std``), so that it moves every target; ``model`` is not changed."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    donor = copy.deepcopy(model)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets, **config)
    if hasattr(donor, "add_adapter"):
        donor.add_adapter(cfg)
    else:  # a stock class without diffusers' adapter API (HunyuanDiT): PEFT's own injection, same layers and keys
        from peft import inject_adapter_in_model
        inject_adapter_in_model(cfg, donor)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in donor.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return donor, get_peft_model_state_dict(donor), cfg
