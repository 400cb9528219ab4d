"""diffusers' attention API on slim models (issue 12): every processor switch keeps the slim model's output
(within 1e-4 relative of its LowRankAttnProcessor output) or raises a SlimDiffError and changes nothing.

The slim UNet here has q/k narrower than v in every attention (4 and 6 of 8 or 16 channels per head, forced
with ``rank_pattern``), the case where stock processors fail or silently compute something else.
"""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import (
    Attention,
    AttnProcessor,
    AttnProcessor2_0,
    CustomDiffusionAttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    XFormersAttnProcessor,
)

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import ConfigError
from slimdiff_diffusers.diffusers_adapter import LowRankAttnProcessor

RANKS = {".*:qk": 4, ".*:vo": 6}


@pytest.fixture(scope="module")
def slim_unet(sd15_unet, sd15_calibration):
    return sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=RANKS, rank_multiple=2)


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 7, 24, generator=gen)


@torch.no_grad()
def run(unet, inputs, **kwargs):
    x, ctx = inputs
    return unet(x, 500, encoder_hidden_states=ctx, **kwargs).sample


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def slimmed_modules(unet):
    return {path: unet.get_submodule(path) for path in unet.slimdiff_spec.attention}


def processors(unet):
    return {name: type(p) for name, p in unet.attn_processors.items()}


def test_fixture_has_qk_narrower_than_v(slim_unet):
    for attn in slimmed_modules(slim_unet).values():
        assert attn.to_q.out_features == 4 * attn.heads and attn.to_v.out_features == 6 * attn.heads


def test_set_default_attn_processor(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    unet.set_default_attn_processor()  # stock: ValueError on LowRankAttnProcessor
    assert rel(run(unet, inputs), ref) < 1e-4
    assert all(type(a.processor) is LowRankAttnProcessor for a in slimmed_modules(unet).values())


@pytest.mark.parametrize("slice_size", [1, 2, "auto", "max"])
def test_set_attention_slice(slim_unet, inputs, slice_size):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    unet.set_attention_slice(slice_size)  # stock SlicedAttnProcessor: "The expanded size of the tensor ... must match"
    kinds = {type(a.processor).__name__ for a in slimmed_modules(unet).values()}
    assert kinds == {"SlicedLowRankAttnProcessor"}
    assert rel(run(unet, inputs), ref) < 1e-4
    unet.set_attention_slice(None)  # disable_attention_slicing's route
    assert all(type(a.processor) is LowRankAttnProcessor for a in slimmed_modules(unet).values())


def test_sliced_processor_keeps_masks_and_upcasting(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    mask = torch.ones(2, 7)
    mask[0, -3:] = 0
    ref = run(unet, inputs, encoder_attention_mask=mask)
    unet.set_attention_slice(1)
    for attn in slimmed_modules(unet).values():
        attn.upcast_attention = attn.upcast_softmax = True
    assert rel(run(unet, inputs, encoder_attention_mask=mask), ref) < 1e-4


@pytest.mark.parametrize("processor", [AttnProcessor2_0, AttnProcessor, XFormersAttnProcessor])
def test_set_attn_processor_stock_is_translated(slim_unet, inputs, processor):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    unet.set_attn_processor(processor())  # stock: RuntimeError (unequal widths) on slimmed modules
    assert all(type(a.processor) is LowRankAttnProcessor for a in slimmed_modules(unet).values())
    assert rel(run(unet, inputs), ref) < 1e-4


def test_equal_but_narrowed_widths_keep_the_original_scale(sd15_unet, sd15_calibration, inputs):
    """q/k and v both 4 of 8 channels: AttnProcessor2_0 would run, with SDPA's scale from the narrowed width."""
    unet = sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern={".*:qk": 4, ".*:vo": 4},
                   rank_multiple=2)
    ref = run(unet, inputs)
    unet.set_attn_processor(AttnProcessor2_0())
    assert rel(run(unet, inputs), ref) < 1e-4


def test_module_level_and_direct_assignment_are_translated(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    modules = list(slimmed_modules(unet).values())
    modules[0].set_processor(AttnProcessor2_0())
    modules[1].processor = AttnProcessor2_0()  # bypasses set_processor: checked at the next forward
    modules[2].set_attention_slice(1)
    assert rel(run(unet, inputs), ref) < 1e-4
    assert type(modules[0].processor) is LowRankAttnProcessor
    assert type(modules[1].processor) is LowRankAttnProcessor


def test_xformers_switch_off_is_translated(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    unet.set_use_memory_efficient_attention_xformers(False)  # what disable_xformers_memory_efficient_attention does
    assert rel(run(unet, inputs), ref) < 1e-4


def test_fuse_and_unfuse_qkv_projections(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    with pytest.raises(sd.UnsupportedProcessorError, match="fuse_qkv_projections"):
        unet.set_attn_processor(FusedAttnProcessor2_0())  # by hand, without fused projections
    unet.fuse_qkv_projections()  # stock: "too many values to unpack" / wrong scale
    kinds = {type(a.processor).__name__ for a in slimmed_modules(unet).values()}
    assert kinds == {"FusedLowRankAttnProcessor"}
    assert all(a.fused_projections for a in slimmed_modules(unet).values())
    assert rel(run(unet, inputs), ref) < 1e-4
    unet.unfuse_qkv_projections()
    assert all(type(a.processor) is LowRankAttnProcessor for a in slimmed_modules(unet).values())
    assert rel(run(unet, inputs), ref) < 1e-4


def test_slim_processors_pass_the_behavioural_probe(slim_unet):
    from slimdiff_diffusers.diffusers_adapter.attention_processor import (
        FusedLowRankAttnProcessor,
        SlicedLowRankAttnProcessor,
        processor_is_slim_aware,
    )

    unet = copy.deepcopy(slim_unet)
    unet.fuse_qkv_projections()
    for attn in slimmed_modules(unet).values():
        for processor in (FusedLowRankAttnProcessor(), SlicedLowRankAttnProcessor(1), LowRankAttnProcessor()):
            assert processor_is_slim_aware(attn, attn.is_cross_attention, processor)
        assert not processor_is_slim_aware(attn, attn.is_cross_attention, AttnProcessor2_0())


class _LoggingAttnProcessor2_0(AttnProcessor2_0):
    """A custom processor that subclasses a stock one (so it assumes one head width, like its base)."""

    calls = 0

    def __call__(self, *args, **kwargs):
        type(self).calls += 1
        return super().__call__(*args, **kwargs)


class _SlimAwareSubclass(AttnProcessor2_0):
    """Subclasses a stock processor but computes like LowRankAttnProcessor: kept (the probe says so)."""

    def __call__(self, *args, **kwargs):
        return LowRankAttnProcessor()(*args, **kwargs)


def test_stock_subclass_is_refused_not_replaced(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref, before = run(unet, inputs), processors(unet)
    with pytest.raises(sd.UnsupportedProcessorError, match="subclasses AttnProcessor2_0"):
        unet.set_attn_processor(_LoggingAttnProcessor2_0())
    assert processors(unet) == before  # nothing changed, not even the unslimmed modules
    assert rel(run(unet, inputs), ref) == 0


def test_slim_aware_stock_subclass_is_kept(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    unet.set_attn_processor(_SlimAwareSubclass())
    assert all(type(a.processor) is _SlimAwareSubclass for a in slimmed_modules(unet).values())
    assert rel(run(unet, inputs), ref) < 1e-4


def test_stock_subclass_is_not_replaced_silently_when_slimming(sd15_unet, sd15_calibration):
    """issue 15: `slim()` replaced a subclass of a stock processor by LowRankAttnProcessor without a word."""
    unet = copy.deepcopy(sd15_unet)
    unet.set_attn_processor(_LoggingAttnProcessor2_0())
    with pytest.raises(sd.UnsupportedProcessorError, match="_LoggingAttnProcessor2_0"):
        sd.slim(unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=RANKS, rank_multiple=2)
    unet.set_attn_processor(_SlimAwareSubclass())
    slimmed = sd.slim(unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=RANKS, rank_multiple=2)
    assert {type(p) for p in slimmed.attn_processors.values()} == {_SlimAwareSubclass}


def _ip_adapter_state_dict(unet, image_embed_dim: int = 12, seed: int = 0) -> dict:
    """A random IP-Adapter in the layout `_load_ip_adapter_weights` reads (made locally: no Hub access)."""
    gen = torch.Generator().manual_seed(seed)
    cross_dim = unet.config.cross_attention_dim
    ip, key_id = {}, 1
    for name in unet.attn_processors:
        if not name.endswith("attn1.processor"):
            hidden = unet.get_submodule(name[: -len(".processor")]).to_out[0].out_features
            ip[f"{key_id}.to_k_ip.weight"] = torch.randn(hidden, cross_dim, generator=gen) * cross_dim ** -0.5
            ip[f"{key_id}.to_v_ip.weight"] = torch.randn(hidden, cross_dim, generator=gen) * cross_dim ** -0.5
        key_id += 2 if not name.endswith("attn1.processor") else 0
    proj = {"proj.weight": torch.randn(4 * cross_dim, image_embed_dim, generator=gen) * image_embed_dim ** -0.5,
            "proj.bias": torch.zeros(4 * cross_dim), "norm.weight": torch.ones(cross_dim),
            "norm.bias": torch.zeros(cross_dim)}
    return {"image_proj": proj, "ip_adapter": ip}


def _image_embeds(batch: int = 2, dim: int = 12):
    return {"image_embeds": [torch.randn(batch, 1, dim, generator=torch.Generator().manual_seed(3))]}


def test_adapter_processors_are_refused_on_slimmed_modules(slim_unet):
    """Custom Diffusion's weights are refused on slimmed modules (IP-Adapter's are mapped: tests/test_ip_adapter.py),
    and so is an IP-Adapter processor given to one module directly (no model, so no basis maps, at that level)."""
    unet = copy.deepcopy(slim_unet)
    before = processors(unet)
    path = next(p for p in unet.slimdiff_spec.attention if p.endswith("attn2"))
    hidden = unet.get_submodule(path).to_out[0].out_features
    with pytest.raises(sd.UnsupportedProcessorError, match="trained against the original"):
        unet.get_submodule(path).set_processor(IPAdapterAttnProcessor2_0(hidden, 24, num_tokens=4))
    assert processors(unet) == before
    for adapter in (CustomDiffusionAttnProcessor2_0(train_kv=True, hidden_size=hidden, cross_attention_dim=24),):
        requested = {name: (adapter if name == f"{path}.processor" else AttnProcessor2_0())
                     for name in unet.attn_processors}
        with pytest.raises(sd.UnsupportedProcessorError, match="trained against the original"):
            unet.set_attn_processor(requested)
        assert processors(unet) == before


@pytest.fixture(scope="module")
def cross_unslimmed(sd15_unet, sd15_calibration):
    """Full-rank slimming of every self-attention, cross-attention kept whole (adapter_compatible): IP-Adapters
    attach as usual."""
    full = {f"{s.name}:{k}": s.head_dim for s in sd15_calibration.sites.attention for k in ("qk", "vo")}
    return sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=full, adapter_compatible=True)


def test_adapter_compatible_keeps_every_cross_attention_whole_and_reports_its_cost(sd15_unet, sd15_calibration):
    slim = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.5, rank_multiple=2, ffn_multiple=8,
                   adapter_compatible=True)
    cross = [s for s in sd15_calibration.sites.attention if s.is_cross]
    assert cross and all(s.name not in slim.slimdiff_spec.attention for s in cross)
    assert any(not s.is_cross and s.name in slim.slimdiff_spec.attention for s in sd15_calibration.sites.attention)
    for s in cross:  # the very same weights as the original
        for proj in ("to_q", "to_k", "to_v"):
            assert torch.equal(getattr(slim.get_submodule(s.name), proj).weight,
                               getattr(sd15_unet.get_submodule(s.name), proj).weight)
    expected = sum(p.numel() for s in cross for m in ("to_q", "to_k", "to_v", "to_out")
                   for p in getattr(sd15_unet.get_submodule(s.name), m).parameters())
    assert slim.slimdiff_report.adapter_params == expected
    assert "kept whole for adapters" in slim.slimdiff_report.to_markdown()
    with pytest.raises(ConfigError, match="adapter_compatible"):
        sd.SlimConfig(keep_ratio=0.5, adapter_compatible="yes")


def test_ip_adapter_with_cross_attention_unslimmed_matches_the_original(sd15_unet, cross_unslimmed, inputs):
    state = _ip_adapter_state_dict(sd15_unet)
    effects = []
    for model in (copy.deepcopy(sd15_unet), copy.deepcopy(cross_unslimmed)):
        without = run(model, inputs)
        model._load_ip_adapter_weights(copy.deepcopy(state))
        effects.append(run(model, inputs, added_cond_kwargs=_image_embeds()) - without)
    assert effects[0].abs().max() > 1e-3  # the adapter does something
    assert rel(effects[1], effects[0]) < 1e-4


def test_unload_ip_adapter_restores_slim_processors(tmp_path, cross_unslimmed, inputs):
    from tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = copy.deepcopy(cross_unslimmed)
    ref = run(pipe.unet, inputs)
    pipe.unet._load_ip_adapter_weights(_ip_adapter_state_dict(pipe.unet))
    pipe.unload_ip_adapter()  # stock puts AttnProcessor2_0 back everywhere it had an IP-Adapter processor
    assert all(type(a.processor) is LowRankAttnProcessor for a in slimmed_modules(pipe.unet).values())
    assert rel(run(pipe.unet, inputs), ref) < 1e-4


def test_pipeline_attention_slicing(tmp_path, slim_unet):
    from tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = copy.deepcopy(slim_unet)
    pipe.set_progress_bar_config(disable=True)

    def sample():
        return pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images

    ref = sample()
    pipe.enable_attention_slicing("max")
    assert rel(sample(), ref) < 1e-4
    pipe.disable_attention_slicing()
    assert rel(sample(), ref) < 1e-4


def test_reloaded_slim_unet_keeps_its_attention_api(tmp_path, slim_unet, inputs):
    slim_unet.save_pretrained(tmp_path / "unet")
    unet = sd.SlimUNet2DConditionModel.from_pretrained(tmp_path / "unet")
    ref = run(unet, inputs)
    assert rel(ref, run(slim_unet, inputs)) < 1e-5
    unet.set_attention_slice(1)
    assert rel(run(unet, inputs), ref) < 1e-4
    unet.set_attn_processor(AttnProcessor2_0())
    assert rel(run(unet, inputs), ref) < 1e-4


def test_unslimmed_modules_keep_stock_behaviour(cross_unslimmed):
    """Only slimmed modules are guarded: excluded cross-attention takes any processor, as in stock diffusers."""
    unet = copy.deepcopy(cross_unslimmed)
    unet.set_attention_slice(1)
    kinds = {name.rsplit(".", 2)[-2]: type(p).__name__ for name, p in unet.attn_processors.items()}
    assert kinds == {"attn1": "SlicedLowRankAttnProcessor", "attn2": "SlicedAttnProcessor"}
    guarded = {name for name, m in unet.named_modules() if isinstance(m, Attention) and type(m) is not Attention}
    assert guarded == set(unet.slimdiff_spec.attention)


class _ScaledOutputProcessor(torch.nn.Module):
    """A stateful custom processor with a (scalar) weight that reads head dims per tensor (like diffusers' own
    test processor): slim-aware, so kept; probing it must not touch its counter."""

    def __init__(self):
        super().__init__()
        self.gain = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        self.calls += 1
        return LowRankAttnProcessor()(attn, hidden_states, encoder_hidden_states, attention_mask) * self.gain


def test_custom_processor_with_unrelated_weights_is_probed_and_kept(slim_unet, inputs):
    unet = copy.deepcopy(slim_unet)
    ref = run(unet, inputs)
    processor = _ScaledOutputProcessor()
    unet.set_attn_processor(processor)
    assert processor.calls == 0  # the probe ran on copies
    out = run(unet, inputs)
    assert processor.calls == len(unet.attn_processors)
    assert rel(out, ref) > 1e-2  # it does what it says (halves every attention output) ...
    unet.set_attn_processor(LowRankAttnProcessor())
    assert rel(run(unet, inputs), ref) < 1e-4  # ... and switching back restores the slim output


def test_uniform_layout_runs_stock_processors_unchanged(sd15_unet, sd15_calibration, inputs):
    """One head width, scale folded into to_q: stock sliced / fused / SDPA processors are kept and exact."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0, SlicedAttnProcessor

    unet = sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=RANKS, rank_multiple=2,
                   head_layout="uniform")
    ref = run(unet, inputs)
    unet.set_attention_slice(1)
    assert {type(a.processor) for a in slimmed_modules(unet).values()} == {SlicedAttnProcessor}
    assert rel(run(unet, inputs), ref) < 1e-4
    unet.set_attn_processor(AttnProcessor2_0())
    unet.fuse_qkv_projections()
    assert {type(a.processor) for a in slimmed_modules(unet).values()} == {FusedAttnProcessor2_0}
    assert rel(run(unet, inputs), ref) < 1e-4
    with pytest.raises(sd.UnsupportedProcessorError, match="trained against the original"):
        path = next(p for p in unet.slimdiff_spec.attention if p.endswith("attn2"))
        attn = unet.get_submodule(path)
        attn.set_processor(IPAdapterAttnProcessor2_0(attn.to_out[0].out_features, 24))
