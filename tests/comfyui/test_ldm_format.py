"""Tier 0 (CI, no ComfyUI): the ComfyUI side of the slim-file format and the node input helpers, on a tiny
stand-in for ComfyUI's ldm UNet.

ComfyUI cannot be imported in CI, so ``LdmStyleUNet`` reproduces what the nodes rely on: ComfyUI's module
names (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``, ``ff.net.0.proj`` GEGLU, ``to_out.0``) and its
attention contract (``dim_head = q.shape[-1] // heads``, softmax scale ``dim_head ** -0.5`` taken from the
tensors, as in ``comfy/ldm/modules/attention.py:attention_pytorch``). The opt-in tiers run the real thing.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # the pack (comfyui_nodes) lives at the repository root
    sys.path.insert(0, str(REPO))

from comfyui_nodes import slim_format  # noqa: E402
from comfyui_nodes.node_inputs import TARGETS, parse_prompt_list, slim_config_for  # noqa: E402
from comfyui_nodes.node_specs import TARGET_CHOICES  # noqa: E402
from slimdiff_diffusers.core import (  # noqa: E402
    BudgetError,
    ConfigError,
    SlimConfig,
    SlimFileError,
    apply_slim_spec,
    calibrate,
    load_slim_file,
    save_slim_file,
    slim,
)
from slimdiff_diffusers.core.config import GROUP_KINDS  # noqa: E402

torch.set_num_threads(1)

DIM, CONTEXT_DIM, HEADS, TOKENS, CONTEXT_TOKENS = 32, 24, 4, 64, 12
LDM_BLOCKS = ("input_blocks.1.1", "middle_block.1", "output_blocks.0.1")
DIFFUSERS_BLOCKS = ("down_blocks.0.attentions.0", "mid_block.attentions.0", "up_blocks.0.attentions.0")


class CrossAttention(nn.Module):
    """ComfyUI's CrossAttention: bias-free q/k/v, ``to_out = Sequential(Linear, Dropout)``."""

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(0.0))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        q = self.to_q(x)
        context = x if context is None else context
        k, v = self.to_k(context), self.to_v(context)
        b, _, width = q.shape
        dim_head = width // self.heads  # from the tensor, as every ComfyUI backend does
        q, k, v = (t.view(b, -1, self.heads, dim_head).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)  # default scale: dim_head ** -0.5
        return self.to_out(out.transpose(1, 2).reshape(b, -1, width))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.attn1 = CrossAttention(dim, None, heads, dim // heads)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim // heads)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__()
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(dim, heads, context_dim)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x, context)
        return x


class LdmStyleUNet(nn.Module):
    """Three transformer stages under ComfyUI (ldm) or diffusers module paths; same parameters for a seed."""

    def __init__(self, block_paths: tuple[str, ...] = LDM_BLOCKS, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.time_embed = nn.Linear(1, DIM)
        self.block_paths = block_paths
        for path in block_paths:
            parent: nn.Module = self
            *parents, leaf = path.split(".")
            for name in parents:
                if not hasattr(parent, name):
                    parent.add_module(name, nn.ModuleDict())
                parent = getattr(parent, name)
            parent.add_module(leaf, SpatialTransformer(DIM, HEADS, CONTEXT_DIM))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.time_embed(timesteps.float().view(-1, 1, 1) / 1000.0)
        for path in self.block_paths:
            x = self.get_submodule(path)(x, context)
        return x


def _inputs(seed: int, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, TOKENS, DIM, generator=g), torch.randint(0, 1000, (batch,), generator=g),
            torch.randn(batch, CONTEXT_TOKENS, CONTEXT_DIM, generator=g))


def _calibrated(model: nn.Module):
    def run():
        for i in range(6):
            model(*_inputs(i))
    return calibrate(model, run)


@pytest.fixture(scope="module")
def ldm_model() -> LdmStyleUNet:
    return LdmStyleUNet(LDM_BLOCKS).eval()


@pytest.fixture(scope="module")
def ldm_calibration(ldm_model):
    with torch.no_grad():
        return _calibrated(ldm_model)


def test_sites_are_found_under_comfyui_names(ldm_calibration):
    names = {s.name for s in ldm_calibration.sites.attention}
    assert names == {f"{b}.transformer_blocks.0.{a}" for b in LDM_BLOCKS for a in ("attn1", "attn2")}
    assert {s.up for s in ldm_calibration.sites.feed_forward} == {
        f"{b}.transformer_blocks.0.ff.net.0.proj" for b in LDM_BLOCKS}


@torch.no_grad()
def test_uniform_layout_at_full_rank_reproduces_comfyui_style_attention(ldm_model, ldm_calibration):
    # The node's configuration (uniform heads, scale folded into to_q) at keep_ratio=1 must be exact under an
    # attention that takes dim_head and the softmax scale from the tensors, like ComfyUI's backends.
    full = slim(ldm_model, ldm_calibration, slim_config_for(1.0, 0.0, "attention+ffn"))
    x = _inputs(99)
    assert torch.allclose(full(*x), ldm_model(*x), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_ldm_slim_file_round_trip_is_bit_identical(tmp_path, ldm_model, ldm_calibration):
    slimmed = slim(ldm_model, ldm_calibration, slim_config_for(0.5, 0.0, "attention+ffn"))
    assert sum(p.numel() for p in slimmed.parameters()) < sum(p.numel() for p in ldm_model.parameters())
    unet_config = {"model_channels": DIM, "context_dim": CONTEXT_DIM, "num_res_blocks": (1, 1),
                   "dtype": torch.float16, "disable_unet_model_creation": False}
    fields = slim_format.comfy_file_fields(unet_config, "SD15", "EPS", "SD15", "0.3.64")
    path = tmp_path / "slim.safetensors"
    save_slim_file(path, slimmed.state_dict(), slimmed.slimdiff_spec, key_layout=fields.key_layout,
                   base_config=fields.base_config, metadata=fields.metadata)

    state_dict, spec, metadata = load_slim_file(path)
    info = slim_format.read_base_model_info(metadata, path.name)
    assert info == slim_format.BaseModelInfo("ldm", {"model_channels": DIM, "context_dim": CONTEXT_DIM,
                                                     "num_res_blocks": [1, 1]}, "SD15", "EPS", "SD15")
    assert metadata[slim_format.COMFY_VERSION] == "0.3.64"
    # The loader's path: the stock model (other weights), the spec's shapes, then the file's weights.
    rebuilt = apply_slim_spec(LdmStyleUNet(LDM_BLOCKS, seed=123).eval(), spec)
    rebuilt.load_state_dict(state_dict, strict=True)
    x = _inputs(7)
    assert torch.equal(rebuilt(*x), slimmed(*x))


@torch.no_grad()
def test_diffusers_layout_file_loads_into_ldm_names(tmp_path):
    # A file written by the diffusers side (diffusers module names) is renamed through a parameter-key map,
    # which ComfyUI provides at run time (comfy.utils.unet_to_diffusers); here the map comes from two
    # identically built models that differ only in naming.
    diffusers_model = LdmStyleUNet(DIFFUSERS_BLOCKS).eval()
    ldm_skeleton = LdmStyleUNet(LDM_BLOCKS, seed=5).eval()
    key_map = dict(zip(diffusers_model.state_dict(), ldm_skeleton.state_dict(), strict=True))
    slimmed = slim(diffusers_model, _calibrated(diffusers_model), SlimConfig(keep_ratio=0.5, head_layout="uniform"))
    path = tmp_path / "from_diffusers.safetensors"
    save_slim_file(path, slimmed.state_dict(), slimmed.slimdiff_spec, key_layout="diffusers",
                   base_config={"block_out_channels": [DIM]})
    state_dict, spec, metadata = load_slim_file(path)
    info = slim_format.read_base_model_info(metadata, path.name)
    assert info.key_layout == "diffusers" and info.model_config_name is None

    ldm_spec = slim_format.rename_spec(spec, key_map, path.name)
    assert set(ldm_spec.attention) == {f"{b}.transformer_blocks.0.{a}" for b in LDM_BLOCKS for a in ("attn1", "attn2")}
    assert set(ldm_spec.feed_forward) == {f"{b}.transformer_blocks.0.ff" for b in LDM_BLOCKS}
    rebuilt = apply_slim_spec(ldm_skeleton, ldm_spec)
    rebuilt.load_state_dict(slim_format.rename_state_dict(state_dict, key_map, path.name), strict=True)
    x = _inputs(3)
    assert torch.equal(rebuilt(*x), slimmed(*x))


def test_rename_errors_name_the_file(ldm_calibration, ldm_model):
    with torch.no_grad():
        spec = slim(ldm_model, ldm_calibration, SlimConfig(keep_ratio=0.5, head_layout="uniform")).slimdiff_spec
    with pytest.raises(SlimFileError, match="my_file.safetensors"):
        slim_format.rename_spec(spec, {"unrelated.weight": "x.weight"}, "my_file.safetensors")
    with pytest.raises(SlimFileError, match="my_file.safetensors.*e.g."):
        slim_format.rename_state_dict({"a.weight": 0, "b.weight": 1}, {"a.weight": "x.weight"}, "my_file.safetensors")


@pytest.mark.parametrize("metadata, message", [
    ({"slimdiff.key_layout": "onnx"}, "unknown key layout"),
    ({"slimdiff.key_layout": "ldm", "slimdiff.base_config": {"a": 1}}, "must record the ComfyUI model config"),
    ({"slimdiff.key_layout": "ldm", "slimdiff.base_config": "{not json",
      slim_format.COMFY_MODEL_CONFIG: "SD15"}, "not valid JSON"),
    ({"slimdiff.key_layout": "ldm", "slimdiff.base_config": [1, 2],
      slim_format.COMFY_MODEL_CONFIG: "SD15"}, "not a JSON object"),
])
def test_bad_base_model_metadata_is_a_clear_error(metadata, message):
    with pytest.raises(SlimFileError, match=f"broken.safetensors: .*{message}"):
        slim_format.read_base_model_info(metadata, "broken.safetensors")


def test_unet_config_is_recorded_without_runtime_entries():
    config = slim_format.jsonable_unet_config({"channel_mult": (1, 2), "dtype": torch.float16, "device": "cpu",
                                               "operations": object(), "context_dim": 768})
    assert config == {"channel_mult": [1, 2], "context_dim": 768}
    with pytest.raises(ValueError, match="not JSON data"):
        slim_format.jsonable_unet_config({"weird": object()})
    json.dumps(config)


def test_slim_node_settings():
    assert tuple(TARGETS) == TARGET_CHOICES
    config = slim_config_for(0.6, 0.0, "attention+ffn")
    assert (config.keep_ratio, config.params_to_remove, config.head_layout) == (0.6, None, "uniform")
    assert config.targets == GROUP_KINDS
    by_params = slim_config_for(0.6, 12.5, "ffn")
    assert (by_params.keep_ratio, by_params.params_to_remove, by_params.targets) == (None, 12_500_000, ("ffn",))
    assert slim_config_for(1.0, 0.0, "attention+ffn, keep cross-attention").exclude == [r".*\.attn2"]
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(BudgetError, match=r"SlimDiff Slim: keep_ratio must be in \(0, 1\]"):
            slim_config_for(bad, 0.0, "attention")
    with pytest.raises(BudgetError, match="params_to_remove_millions must be >= 0"):
        slim_config_for(0.5, -1.0, "attention")
    with pytest.raises(ValueError, match="unknown targets"):
        slim_config_for(0.5, 0.0, "everything")


def test_slim_node_passes_its_slim_config_combos_through():
    # Each combo the node offers (SLIM_CONFIG_COMBOS) reaches SlimConfig as chosen; left out (an API prompt made
    # before it was offered) or None it takes SlimConfig's default.
    assert slim_config_for(0.6, 0.0, "attention+ffn").allocation_refinement == "auto"
    for value in SlimConfig.option_choices("allocation_refinement"):
        assert slim_config_for(0.6, 0.0, "attention", allocation_refinement=value).allocation_refinement == value
    assert slim_config_for(0.6, 0.0, "attention", allocation_refinement=None).allocation_refinement == "auto"
    from comfyui_nodes.node_specs import SLIM_CONFIG_COMBOS

    for name in SLIM_CONFIG_COMBOS:  # vo_output_refit, vo_statistics, ffn_selection: the same way
        for value in SlimConfig.option_choices(name):
            assert getattr(slim_config_for(0.6, 0.0, "attention+ffn", **{name: value}), name) == value
        assert getattr(slim_config_for(0.6, 0.0, "attention+ffn", **{name: None}), name) == \
            SlimConfig.option_default(name)
    # V3 combo values are not checked by ComfyUI 0.3.64: a value SlimConfig refuses is an error naming the node.
    with pytest.raises(ConfigError, match="SlimDiff Slim: allocation_refinement must be one of"):
        slim_config_for(0.6, 0.0, "attention", allocation_refinement="greedy")
    with pytest.raises(ValueError, match="unknown setting.*propagation; it offers allocation_refinement"):
        slim_config_for(0.6, 0.0, "attention", propagation="none")


@torch.no_grad()
def test_keep_cross_attention_leaves_attn2_untouched(ldm_model, ldm_calibration):
    slimmed = slim(ldm_model, ldm_calibration, slim_config_for(0.5, 0.0, "attention+ffn, keep cross-attention"))
    assert slimmed.slimdiff_spec.attention and not any(p.endswith("attn2") for p in slimmed.slimdiff_spec.attention)
    for block in LDM_BLOCKS:
        attn2 = f"{block}.transformer_blocks.0.attn2"
        assert torch.equal(slimmed.get_submodule(attn2).to_q.weight, ldm_model.get_submodule(attn2).to_q.weight)


def test_prompt_list_parsing():
    assert parse_prompt_list("  a cat \n\n\tdog\n   \n") == ["a cat", "dog"]
    assert parse_prompt_list("\n  \n") == []


# --------------------------------------------------------------------------------------------------
# Files written by the diffusers side
# --------------------------------------------------------------------------------------------------

# The official diffusers UNet configs (config.json of the SD1.5 and SDXL-base repositories, architecture keys).
SD15_DIFFUSERS = {
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4, "use_linear_projection": False,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_DIFFUSERS = {
    "block_out_channels": [320, 640, 1280], "layers_per_block": 2, "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048, "in_channels": 4, "out_channels": 4, "use_linear_projection": True,
    "transformer_layers_per_block": [1, 2, 10], "addition_embed_type": "text_time",
    "projection_class_embeddings_input_dim": 2816,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# ComfyUI 0.3.64's own unet_configs for these models (comfy/model_detection.py:796-830, without dtype).
SD15_COMFY = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_COMFY = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


@pytest.mark.parametrize("diffusers_config, comfy_config", [(SD15_DIFFUSERS, SD15_COMFY), (SDXL_DIFFUSERS, SDXL_COMFY)],
                         ids=["sd15", "sdxl"])
def test_diffusers_config_maps_to_comfyui_unet_config(diffusers_config, comfy_config):
    mapped = slim_format.ldm_unet_config_from_diffusers(diffusers_config)
    # ComfyUI's dicts carry only the head setting they use; the mapping also states the other as -1.
    unused_head_key = "num_head_channels" if "num_heads" in comfy_config else "num_heads"
    assert mapped.pop(unused_head_key) == -1
    assert mapped == comfy_config


def test_diffusers_config_that_comfyui_cannot_build_is_refused():
    bad = dict(SD15_DIFFUSERS, attention_head_dim=[8, 5, 20, 20])
    with pytest.raises(ValueError, match="neither constant"):
        slim_format.ldm_unet_config_from_diffusers(bad)


@torch.no_grad()
def test_separate_layout_converts_exactly_to_the_uniform_layout():
    # A real diffusers UNet (SD1.5 block structure): the diffusers side's "separate" layout, converted for
    # ComfyUI, must equal slimming straight to "uniform" (same ranks: allocation does not depend on layout).
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24, attention_head_dim=2, norm_num_groups=8).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 4, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
                torch.randn(4, 6, 24, generator=g)) for _ in range(4)]
    calibration = calibrate(unet, lambda: [unet(x, t, encoder_hidden_states=c) for x, t, c in batches])
    separate = slim(unet, calibration, SlimConfig(keep_ratio=0.5, head_layout="separate"))
    uniform = slim(unet, calibration, SlimConfig(keep_ratio=0.5, head_layout="uniform"))
    assert any(a.qk_rank != a.vo_rank for a in separate.slimdiff_spec.attention.values()), "needs differing ranks"
    state, spec = slim_format.to_uniform_layout_state(separate.state_dict(), separate.slimdiff_spec)
    assert spec.to_dict() == uniform.slimdiff_spec.to_dict()
    expected = uniform.state_dict()
    assert state.keys() == expected.keys()
    for key in state:
        torch.testing.assert_close(state[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)


def test_unconditional_diffusers_unet_is_refused():
    with pytest.raises(ValueError, match="UNet2DModel is not a text-conditioned UNet"):
        slim_format.ldm_unet_config_from_diffusers(dict(SD15_DIFFUSERS, _class_name="UNet2DModel"))
