"""Transformer-family key layouts of the ComfyUI pack (pure python: runs without ComfyUI).

The key map here is written in the format of ComfyUI's own maps (``comfy.utils.flux_to_diffusers``: a name, or
``(name, (dim, start, size))`` for a slice of a fused tensor, or ``(name, None, fn)``) for one Flux double block
and one single-stream block; the tier-1 tests run the real maps against ComfyUI's model classes.
"""
from __future__ import annotations

import pytest
import torch

from comfyui_nodes import slim_format
from slimdiff_diffusers.core.errors import SlimFileError
from slimdiff_diffusers.core.spec import AttentionSpec, FeedForwardSpec, SlimSpec

HEADS, HEAD_DIM, MLP = 2, 4, 16
D = HEADS * HEAD_DIM


def _swap(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def key_map() -> dict:
    out = {}
    for end in ("weight", "bias"):
        for i, (img, txt) in enumerate((("to_q", "add_q_proj"), ("to_k", "add_k_proj"), ("to_v", "add_v_proj"))):
            out[f"transformer_blocks.0.attn.{img}.{end}"] = (f"double_blocks.0.img_attn.qkv.{end}", (0, i * D, D))
            out[f"transformer_blocks.0.attn.{txt}.{end}"] = (f"double_blocks.0.txt_attn.qkv.{end}", (0, i * D, D))
            out[f"single_transformer_blocks.0.attn.{img}.{end}"] = (f"single_blocks.0.linear1.{end}", (0, i * D, D))
        out[f"single_transformer_blocks.0.proj_mlp.{end}"] = (f"single_blocks.0.linear1.{end}", (0, 3 * D, MLP))
        out[f"transformer_blocks.0.attn.to_out.0.{end}"] = f"double_blocks.0.img_attn.proj.{end}"
        out[f"transformer_blocks.0.attn.to_add_out.{end}"] = f"double_blocks.0.txt_attn.proj.{end}"
        out[f"transformer_blocks.0.ff.net.0.proj.{end}"] = f"double_blocks.0.img_mlp.0.{end}"
        out[f"transformer_blocks.0.ff.net.2.{end}"] = f"double_blocks.0.img_mlp.2.{end}"
        out[f"single_transformer_blocks.0.proj_out.{end}"] = f"single_blocks.0.linear2.{end}"
        out[f"norm_out.linear.{end}"] = (f"final_layer.adaLN_modulation.1.{end}", None, _swap)
    return out


def spec() -> SlimSpec:
    return SlimSpec(
        attention={"transformer_blocks.0.attn": AttentionSpec(HEADS, HEAD_DIM, HEAD_DIM, 3, kind="joint"),
                   "single_transformer_blocks.0.attn": AttentionSpec(HEADS, HEAD_DIM, HEAD_DIM, 2, kind="single")},
        feed_forward={"transformer_blocks.0.ff": FeedForwardSpec(MLP, 10, False),
                      "single_transformer_blocks.0": FeedForwardSpec(MLP, 6, False, kind="single")})


def slim_state(s: SlimSpec) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    joint, single = s.attention["transformer_blocks.0.attn"], s.attention["single_transformer_blocks.0.attn"]
    rows = {"to_q": D, "to_k": D, "to_v": HEADS * joint.vo_rank, "add_q_proj": D, "add_k_proj": D,
            "add_v_proj": HEADS * joint.vo_rank}
    out = {}
    for name, n in rows.items():
        out[f"transformer_blocks.0.attn.{name}.weight"] = torch.randn(n, D, generator=g)
        out[f"transformer_blocks.0.attn.{name}.bias"] = torch.randn(n, generator=g)
    for name, n in {"to_q": D, "to_k": D, "to_v": HEADS * single.vo_rank, "proj_mlp": 6}.items():
        prefix = "single_transformer_blocks.0" + ("" if name == "proj_mlp" else ".attn")
        out[f"{prefix}.{name}.weight"] = torch.randn(n, D, generator=g)
        out[f"{prefix}.{name}.bias"] = torch.randn(n, generator=g)
    for name, cols in {"attn.to_out.0": HEADS * joint.vo_rank, "attn.to_add_out": HEADS * joint.vo_rank}.items():
        out[f"transformer_blocks.0.{name}.weight"] = torch.randn(D, cols, generator=g)
        out[f"transformer_blocks.0.{name}.bias"] = torch.randn(D, generator=g)
    out["transformer_blocks.0.ff.net.0.proj.weight"] = torch.randn(10, D, generator=g)
    out["transformer_blocks.0.ff.net.0.proj.bias"] = torch.randn(10, generator=g)
    out["transformer_blocks.0.ff.net.2.weight"] = torch.randn(D, 10, generator=g)
    out["transformer_blocks.0.ff.net.2.bias"] = torch.randn(D, generator=g)
    out["single_transformer_blocks.0.proj_out.weight"] = torch.randn(D, HEADS * single.vo_rank + 6, generator=g)
    out["single_transformer_blocks.0.proj_out.bias"] = torch.randn(D, generator=g)
    out["norm_out.linear.weight"] = torch.randn(2 * D, D, generator=g)
    out["norm_out.linear.bias"] = torch.randn(2 * D, generator=g)
    return out


def test_fused_layers_hold_kept_rows_and_scatter_per_head_prefixes():
    s = spec()
    comfy, layouts = slim_format.dit_to_comfy_state(slim_state(s), s, key_map(), "f.safetensors")
    qkv = comfy["double_blocks.0.img_attn.qkv.weight"]
    assert qkv.shape == (2 * D + HEADS * 3, D)
    layout = layouts["double_blocks.0.img_attn.qkv"]
    # q and k whole, then each head's first 3 value channels at that head's position of the v part
    assert layout.full_out == 3 * D
    assert layout.out_index.tolist() == list(range(2 * D)) + [16, 17, 18, 20, 21, 22]
    assert layouts["double_blocks.0.img_attn.proj"].in_index.tolist() == [0, 1, 2, 4, 5, 6]
    assert layouts["double_blocks.0.txt_attn.proj"].in_index.tolist() == [0, 1, 2, 4, 5, 6]
    linear1 = layouts["single_blocks.0.linear1"]
    assert linear1.full_out == 3 * D + MLP
    assert linear1.out_index.tolist() == list(range(2 * D)) + [16, 17, 20, 21] + [24 + j for j in range(6)]
    assert layouts["single_blocks.0.linear2"].in_index.tolist() == [0, 1, 4, 5] + [D + j for j in range(6)]
    assert "double_blocks.0.img_mlp.0" not in layouts  # a plain feed-forward is simply narrower
    assert torch.equal(comfy["final_layer.adaLN_modulation.1.weight"], _swap(slim_state(s)["norm_out.linear.weight"]))


def test_scatter_and_gather_reproduce_the_separate_layers():
    """A fused layer with its layout, read by the gathering reader, computes what diffusers' layers compute."""
    s = spec()
    state = slim_state(s)
    comfy, layouts = slim_format.dit_to_comfy_state(state, s, key_map(), "f.safetensors")
    x = torch.randn(5, D)
    layout = layouts["double_blocks.0.img_attn.qkv"]
    fused = x @ comfy["double_blocks.0.img_attn.qkv.weight"].T + comfy["double_blocks.0.img_attn.qkv.bias"]
    full = torch.zeros(5, layout.full_out).index_copy_(1, layout.out_index, fused)
    v = full[:, 2 * D:]  # what ComfyUI's split hands to the attention as values (zeros where narrowed)
    reader = layouts["double_blocks.0.img_attn.proj"]
    out = v.index_select(1, reader.in_index) @ comfy["double_blocks.0.img_attn.proj.weight"].T
    v_slim = x @ state["transformer_blocks.0.attn.to_v.weight"].T + state["transformer_blocks.0.attn.to_v.bias"]
    assert torch.allclose(out, v_slim @ state["transformer_blocks.0.attn.to_out.0.weight"].T, atol=1e-5)
    q = x @ state["transformer_blocks.0.attn.to_q.weight"].T + state["transformer_blocks.0.attn.to_q.bias"]
    assert torch.allclose(full[:, :D], q, atol=1e-6)


def test_round_trip_is_exact():
    s = spec()
    state = slim_state(s)
    comfy, _ = slim_format.dit_to_comfy_state(state, s, key_map(), "f.safetensors")
    back = slim_format.comfy_to_dit_state(comfy, s, key_map(), "f.safetensors")
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_bad_tensors_are_clear_errors():
    s = spec()
    state = slim_state(s)
    with pytest.raises(SlimFileError, match="f.safetensors: 1 tensors have names"):
        slim_format.dit_to_comfy_state({**state, "foo.weight": torch.zeros(1)}, s, key_map(), "f.safetensors")
    wrong = dict(state)
    wrong["transformer_blocks.0.attn.to_v.weight"] = torch.zeros(HEADS * 4, D)
    with pytest.raises(SlimFileError, match="to_v.weight has 8 rows where its slim spec gives 6"):
        slim_format.dit_to_comfy_state(wrong, s, key_map(), "f.safetensors")
    missing = {k: v for k, v in state.items() if "add_k_proj" not in k}
    with pytest.raises(SlimFileError, match="txt_attn.qkv.weight needs"):
        slim_format.dit_to_comfy_state(missing, s, key_map(), "f.safetensors")
    comfy, _ = slim_format.dit_to_comfy_state(state, s, key_map(), "f.safetensors")
    with pytest.raises(SlimFileError, match="no diffusers name"):
        slim_format.comfy_to_dit_state({**comfy, "pe.weight": torch.zeros(1)}, s, key_map(), "f.safetensors")


def test_transformer_configs_map_both_ways():
    flux = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None,
            "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
            "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
            "axes_dims_rope": [16, 56, 56]}
    unet = slim_format.flux_unet_config(flux)
    # what ComfyUI's detection writes for Flux-dev
    assert unet == {"image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
                    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19,
                    "depth_single_blocks": 38, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
                    "guidance_embed": True}
    back = slim_format.flux_diffusers_config(unet)
    assert back == {**flux, "out_channels": 64}
    assert slim_format.transformer_family(back) == "Flux"
    with pytest.raises(ValueError, match="packed-latent"):
        slim_format.flux_unet_config({**flux, "patch_size": 2})
    sd3 = {"depth": 24, "in_channels": 16, "patch_size": 2, "out_channels": 16, "adm_in_channels": 2048,
           "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 1536}},
           "num_patches": 36864, "pos_embed_max_size": 192, "x_block_self_attn_layers": [], "qk_norm": None}
    config = slim_format.sd3_diffusers_config(sd3)
    assert (config["num_attention_heads"], config["caption_projection_dim"], config["pooled_projection_dim"]) == \
        (24, 1536, 2048)
    assert slim_format.sd3_key_map_config(config) == {"depth": 24, "num_blocks": 24}
    assert slim_format.transformer_family({"_class_name": "UNet2DConditionModel"}) is None


def test_slim_files_of_families_comfyui_cannot_load_are_named_before_anything_is_built():
    """Every class a diffusers-side slim file may record (the stock class of each Slim* family): the Load Slim
    Model node takes Flux, SD3, PixArt and the UNets; the others (Chroma, DiT, Qwen-Image, Wan, ...) are refused by
    name instead of going down ComfyUI's UNet detection (comfy_models.load_slim_model)."""
    from slimdiff_diffusers.diffusers_adapter.models import SLIM_MODEL_FAMILIES

    loadable = {"FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel", "UNet2DConditionModel"}
    names = {family.base.__name__ for family in SLIM_MODEL_FAMILIES}
    assert loadable <= names and len(names - loadable) >= 5
    for name in names:
        assert slim_format.unsupported_class({"_class_name": name}) == (None if name in loadable else name)
    assert slim_format.unsupported_class({}) is None  # ComfyUI's own UNet slims record no diffusers class


def test_linear_parts_give_each_diffusers_linear_its_rows_before_and_after_slimming():
    # What SlimDiff Load LoRA splits a fused patch by: the parts in row order, their original rows (ComfyUI's
    # key map) and their rows in the slim weight (dit_to_comfy_state's layout: the same tensors, concatenated).
    s = spec()
    parts = slim_format.comfy_linear_parts(s, key_map())
    P = slim_format.LinearPart
    assert parts["single_blocks.0.linear1"] == (
        P("single_transformer_blocks.0.attn.to_q", 0, D, 0, D),
        P("single_transformer_blocks.0.attn.to_k", D, D, D, D),
        P("single_transformer_blocks.0.attn.to_v", 2 * D, D, 2 * D, HEADS * 2),
        P("single_transformer_blocks.0.proj_mlp", 3 * D, MLP, 2 * D + HEADS * 2, 6))
    assert parts["double_blocks.0.txt_attn.qkv"][2] == P("transformer_blocks.0.attn.add_v_proj", 2 * D, D, 2 * D, 6)
    assert parts["single_blocks.0.linear2"] == (P("single_transformer_blocks.0.proj_out", None, None, None, None),)
    assert "final_layer.adaLN_modulation.1" not in parts  # converted by a function: never a narrowed Linear
    state, _ = slim_format.dit_to_comfy_state(slim_state(s), s, key_map(), "test")
    for path, laid in parts.items():
        if laid[0].start is not None:  # the slim weight holds exactly the parts' slim rows, in this order
            assert state[f"{path}.weight"].shape[0] == laid[-1].slim_start + laid[-1].slim_rows
