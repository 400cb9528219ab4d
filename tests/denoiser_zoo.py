"""Tiny configurations of the diffusers denoisers users point SlimDiff at (issue 10's robustness sweep).

Each entry builds a randomly initialised model of the real block structure of its class (diffusers 0.42) and
gives keyword arguments for one forward call at a timestep. Widths are a few dozen: a forward takes milliseconds
on CPU. Classes missing from the installed diffusers give ``None`` (the tests skip them with the reason).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import diffusers
import torch

from tiny_models import flux_inputs, sd3_inputs, tiny_flux_transformer, tiny_sd3_transformer


@dataclass
class Denoiser:
    """A tiny model and its inputs: ``inputs(t, seed)`` gives keyword arguments for a forward at timestep ``t``
    (a fraction in (0, 1]; scaled to the model's own timestep convention), ``output(out)`` the output tensor."""

    name: str
    make: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module, float, int], dict]
    output: Callable[[object], torch.Tensor] = lambda out: out[0]


def _cls(name: str):
    return getattr(diffusers, name, None)


def _build(name: str, **config):
    """``diffusers.<name>(**config)`` in eval mode, its weights drawn from seed 0."""
    torch.manual_seed(0)
    return _cls(name)(**config).eval()


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _chroma():
    return _build("ChromaTransformer2DModel",
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=12, axes_dims_rope=(2, 2, 4), approximator_num_channels=8, approximator_hidden_dim=16,
        approximator_layers=1)


def _chroma_inputs(model, t, seed, batch=2, side=4, text_len=5):
    g = _g(seed)
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    return {"hidden_states": torch.randn(batch, side * side, model.config.in_channels, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, model.config.joint_attention_dim, generator=g),
            "timestep": torch.full((batch,), t), "img_ids": img_ids.reshape(-1, 3), "txt_ids": torch.zeros(text_len, 3),
            "return_dict": False}


def _qwen():
    return _build("QwenImageTransformer2DModel",
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, guidance_embeds=False, axes_dims_rope=(8, 4, 4))


def _qwen_inputs(model, t, seed, batch=2, text_len=5):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, 16, 16, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, 12, generator=g),
            "encoder_hidden_states_mask": torch.ones(batch, text_len, dtype=torch.long),
            "timestep": torch.full((batch,), t), "img_shapes": [(1, 4, 4)] * batch, "return_dict": False}


def _auraflow():
    return _build("AuraFlowTransformer2DModel",
        sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1, num_single_dit_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16, out_channels=4,
        pos_embed_max_size=16)


def _latents_inputs(channels: int, side: int, text_dim: int, scale: float = 1000.0, text_len: int = 5, **extra):
    def inputs(model, t, seed, batch=2):
        g = _g(seed)
        return {"hidden_states": torch.randn(batch, channels, side, side, generator=g),
                "encoder_hidden_states": torch.randn(batch, text_len, text_dim, generator=g),
                "timestep": torch.full((batch,), t * scale), **extra, "return_dict": False}
    return inputs


def _hunyuan(**overrides):
    """``overrides``: config entries to change (HunyuanDiTPipeline pads its prompts to text_len 77 / 256)."""
    return _build("HunyuanDiT2DModel", **dict(
        sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        cross_attention_dim=8, cross_attention_dim_t5=8, pooled_projection_dim=4, hidden_size=16, text_len=4,
        text_len_t5=4, activation_fn="gelu-approximate") | overrides)


def _hunyuan_inputs(model, t, seed, batch=2):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 4, 8, generator=g),
            "text_embedding_mask": torch.ones(batch, 4),
            "encoder_hidden_states_t5": torch.randn(batch, 4, 8, generator=g),
            "text_embedding_mask_t5": torch.ones(batch, 4),
            "timestep": torch.full((batch,), t * 1000),
            "image_meta_size": torch.tensor([[1024.0, 1024, 16, 16, 0, 0]] * batch),
            "style": torch.zeros(batch, dtype=torch.long),
            "image_rotary_emb": [torch.ones(1, 8), torch.zeros(1, 8)], "return_dict": False}


def _lumina2():
    return _build("Lumina2Transformer2DModel",
        sample_size=8, patch_size=2, in_channels=4, hidden_size=24, num_layers=2, num_refiner_layers=1,
        num_attention_heads=3, num_kv_heads=1, multiple_of=2, ffn_dim_multiplier=None, norm_eps=1e-5,
        scaling_factor=1.0, axes_dim_rope=(4, 2, 2), axes_lens=(128, 128, 128), cap_feat_dim=12)


def _lumina2_inputs(model, t, seed, batch=2, text_len=5):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, 12, generator=g),
            "timestep": torch.full((batch,), t),
            "encoder_attention_mask": torch.ones(batch, text_len, dtype=torch.bool), "return_dict": False}


def _sana():
    return _build("SanaTransformer2DModel",
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=4, num_attention_heads=2,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=8)


def _cogview4():
    return _build("CogView4Transformer2DModel",
        patch_size=2, in_channels=4, num_layers=2, attention_head_dim=4, num_attention_heads=4, out_channels=4,
        text_embed_dim=8, time_embed_dim=8, condition_dim=4)


def _cogview4_inputs(model, t, seed, batch=2):
    g = _g(seed)
    size = torch.tensor([[64, 64]] * batch)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 5, 8, generator=g),
            "timestep": torch.full((batch,), t * 1000), "original_size": size, "target_size": size,
            "crop_coords": torch.zeros(batch, 2, dtype=torch.long), "return_dict": False}


def _hidream():
    return _build("HiDreamImageTransformer2DModel",
        patch_size=2, in_channels=4, out_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8,
        num_attention_heads=4, caption_channels=[8, 4], text_emb_dim=8, num_routed_experts=2,
        num_activated_experts=2, axes_dims_rope=(4, 2, 2), max_resolution=(32, 32), llama_layers=(0, 1),
        force_inference_output=True)


def _hidream_inputs(model, t, seed, batch=2):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "encoder_hidden_states_t5": torch.randn(batch, 5, 8, generator=g),
            "encoder_hidden_states_llama3": torch.randn(2, batch, 5, 4, generator=g),
            "pooled_embeds": torch.randn(batch, 8, generator=g),
            "timesteps": torch.full((batch,), t * 1000), "return_dict": False}


def _wan():
    return _build("WanTransformer3DModel",
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32)


def _wan_inputs(model, t, seed, batch=1):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, 4, 2, 8, 8, generator=g),
            "encoder_hidden_states": torch.randn(batch, 6, 16, generator=g),
            "timestep": torch.full((batch,), t * 1000), "return_dict": False}


def _ltx():
    return _build("LTXVideoTransformer3DModel",
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        num_layers=2, qk_norm="rms_norm_across_heads", caption_channels=16)


def _ltx_inputs(model, t, seed, batch=2, frames=2, side=4, text_len=5):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, frames * side * side, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, 16, generator=g),
            "timestep": torch.full((batch,), t * 1000),
            "encoder_attention_mask": torch.ones(batch, text_len, dtype=torch.bool),
            "num_frames": frames, "height": side, "width": side, "return_dict": False}


def _dit():
    return _build("DiTTransformer2DModel",
        in_channels=4, out_channels=8, activation_fn="gelu-approximate", num_attention_heads=2, attention_head_dim=8,
        attention_bias=True, num_layers=2, norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2,
        sample_size=8)


def _dit_inputs(model, t, seed, batch=2):
    g = _g(seed)
    return {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
            "timestep": torch.full((batch,), t * 1000).long(), "class_labels": torch.randint(0, 4, (batch,), generator=g), "return_dict": False}


def _flux2():
    return _build("Flux2Transformer2DModel",
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=12, timestep_guidance_channels=256, axes_dims_rope=(4, 4, 4, 4))


def _flux2_inputs(model, t, seed, batch=2, side=4, text_len=5):
    g = _g(seed)
    image_ids = torch.cartesian_prod(torch.arange(1), torch.arange(side), torch.arange(side), torch.arange(1))
    text_ids = torch.cartesian_prod(torch.arange(1), torch.arange(1), torch.arange(1), torch.arange(text_len))
    return {"hidden_states": torch.randn(batch, side * side, 4, generator=g),
            "encoder_hidden_states": torch.randn(batch, text_len, 12, generator=g),
            "img_ids": image_ids.unsqueeze(0).expand(batch, -1, -1),
            "txt_ids": text_ids.unsqueeze(0).expand(batch, -1, -1),
            "timestep": torch.full((batch,), t), "guidance": torch.full((batch,), 3.5), "return_dict": False}


def _zimage():
    return _build("ZImageTransformer2DModel",
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=16, n_layers=1, n_refiner_layers=1, n_heads=1,
        n_kv_heads=2, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0, axes_dims=[8, 4, 4],
        axes_lens=[256, 32, 32])


def _zimage_inputs(model, t, seed, batch=1):
    g = _g(seed)
    return {"x": [torch.randn(16, 1, 8, 8, generator=g) for _ in range(batch)],
            "cap_feats": [torch.randn(8, 16, generator=g) for _ in range(batch)],
            "t": torch.full((1,), t), "return_dict": False}


def _fused(make):
    def build():
        model = make()
        model.fuse_qkv_projections()
        return model
    return build


def _custom_processor():
    """A Flux model whose first double block's attention runs a user's own processor (a subclass that changes
    nothing here, but SlimDiff cannot know that)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    class UserFluxProcessor(FluxAttnProcessor):
        pass
    model = tiny_flux_transformer()
    model.transformer_blocks[0].attn.set_processor(UserFluxProcessor())
    return model


def _flux_inputs(model, t, seed):
    kwargs = flux_inputs(model, seed=seed)
    kwargs["timestep"] = torch.full_like(kwargs["timestep"], t)
    return kwargs


def _sd3_inputs(model, t, seed):
    kwargs = sd3_inputs(model, seed=seed)
    kwargs["timestep"] = torch.full_like(kwargs["timestep"], t * 1000)
    return kwargs


DENOISERS: list[Denoiser] = [
    Denoiser("ChromaTransformer2DModel", _chroma, _chroma_inputs),
    Denoiser("QwenImageTransformer2DModel", _qwen, _qwen_inputs),
    Denoiser("AuraFlowTransformer2DModel", _auraflow, _latents_inputs(4, 8, 12)),
    Denoiser("HunyuanDiT2DModel", _hunyuan, _hunyuan_inputs),
    Denoiser("Lumina2Transformer2DModel", _lumina2, _lumina2_inputs),
    Denoiser("SanaTransformer2DModel", _sana, _latents_inputs(4, 8, 8)),
    Denoiser("CogView4Transformer2DModel", _cogview4, _cogview4_inputs),
    Denoiser("HiDreamImageTransformer2DModel", _hidream, _hidream_inputs),
    Denoiser("WanTransformer3DModel", _wan, _wan_inputs),
    Denoiser("LTXVideoTransformer3DModel", _ltx, _ltx_inputs),
    Denoiser("DiTTransformer2DModel", _dit, _dit_inputs),
    Denoiser("Flux2Transformer2DModel", _flux2, _flux2_inputs),
    Denoiser("ZImageTransformer2DModel", _zimage, _zimage_inputs, output=lambda out: torch.stack(list(out[0]))),
    Denoiser("FluxTransformer2DModel+fused", _fused(tiny_flux_transformer), _flux_inputs),
    Denoiser("SD3Transformer2DModel+fused", _fused(tiny_sd3_transformer), _sd3_inputs),
    Denoiser("FluxTransformer2DModel+custom-processor", _custom_processor, _flux_inputs),
]


def available(entry: Denoiser) -> bool:
    """Whether the installed diffusers has the entry's class."""
    return _cls(entry.name.split("+")[0]) is not None
