"""LowRankAttnProcessor and the handling of custom processors."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

import slimdiff_diffusers as sd
from slimdiff_diffusers.diffusers_adapter import LowRankAttnProcessor, processor_is_slim_aware


@pytest.mark.parametrize("cross", [False, True])
def test_matches_attnprocessor2_0_on_unslimmed_modules_with_masks(cross):
    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8).eval()
    x = torch.randn(2, 10, 32)
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16)} if cross else {}
    mask = torch.ones(2, 5 if cross else 10)
    mask[0, -2:] = 0
    mask = (1 - mask[:, None, :]) * -10000.0
    with torch.no_grad():
        ref = attn(x, attention_mask=mask, **kw)
        attn.set_processor(LowRankAttnProcessor())
        out = attn(x, attention_mask=mask, **kw)
    assert torch.allclose(ref, out, atol=1e-6)


def test_uses_original_scale_with_separate_head_dims():
    """Keep 4 of 8 q/k channels and 6 of 8 v channels per head: logits keep the original 1/sqrt(8) scale."""
    torch.manual_seed(0)
    attn = Attention(32, heads=4, dim_head=8).eval()
    x = torch.randn(1, 10, 32)
    qk_rows = torch.cat([torch.arange(h * 8, h * 8 + 4) for h in range(4)])
    v_rows = torch.cat([torch.arange(h * 8, h * 8 + 6) for h in range(4)])
    with torch.no_grad():
        q = attn.to_q(x)[..., qk_rows].view(1, 10, 4, 4)
        k = attn.to_k(x)[..., qk_rows].view(1, 10, 4, 4)
        v = attn.to_v(x)[..., v_rows].view(1, 10, 4, 6)
        p = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) * 8 ** -0.5, -1)
        heads_out = torch.einsum("bhnm,bmhd->bnhd", p, v).reshape(1, 10, 24)
        expected = heads_out @ attn.to_out[0].weight[:, v_rows].T + attn.to_out[0].bias

        slim = copy.deepcopy(attn)
        for name, rows in (("to_q", qk_rows), ("to_k", qk_rows), ("to_v", v_rows)):
            new = torch.nn.Linear(32, len(rows), bias=False)
            new.weight.data = getattr(attn, name).weight.data[rows]
            setattr(slim, name, new)
        out_layer = torch.nn.Linear(24, 32)
        out_layer.weight.data, out_layer.bias.data = attn.to_out[0].weight.data[:, v_rows], attn.to_out[0].bias.data
        slim.to_out[0] = out_layer
        slim.set_processor(LowRankAttnProcessor())
        got = slim(x)
    assert torch.allclose(got, expected, atol=1e-5)
    # the stock processor would scale by 1/sqrt(4) and cannot even reshape v: it must not be used here
    slim.set_processor(AttnProcessor2_0())
    with pytest.raises(RuntimeError):
        slim(x)


class _SharedHeadDimProcessor:
    """A custom processor written for equal q/k/v widths (like many third-party ones)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        ctx = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(ctx), attn.to_v(ctx)
        b, n, inner = q.shape
        dh = inner // attn.heads
        q, k, v = (t.view(b, -1, attn.heads, dh).transpose(1, 2) for t in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return attn.to_out[0](o.transpose(1, 2).reshape(b, n, -1))


def test_custom_processor_probe():
    attn = Attention(32, heads=4, dim_head=8).eval()
    attn.set_processor(_SharedHeadDimProcessor())
    assert not processor_is_slim_aware(attn, is_cross=False)
    attn.set_processor(LowRankAttnProcessor())
    assert processor_is_slim_aware(attn, is_cross=False)


def test_unaware_custom_processor_is_refused_before_anything_changes(sd15_unet, sd15_calibration):
    unet = copy.deepcopy(sd15_unet)
    path = sd15_calibration.sites.attention[0].name
    unet.get_submodule(path).set_processor(_SharedHeadDimProcessor())
    with pytest.raises(sd.UnsupportedProcessorError, match="_SharedHeadDimProcessor"):
        sd.slim(unet, sd15_calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8)
    assert isinstance(unet.get_submodule(path).processor, _SharedHeadDimProcessor)
    # ...but the uniform layout runs with any processor, and excluding the module works too
    sd.slim(unet, sd15_calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8, head_layout="uniform")
    sd.slim(unet, sd15_calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8, exclude=[path])


class _SlimAwareSubclass(LowRankAttnProcessor):
    """A user's processor that computes attention from the projected tensors (it passes the probe undeclared)."""


@pytest.mark.parametrize("passes", ["one pass", "passes under a memory limit"])
def test_unaware_custom_processor_on_plain_attention_is_refused_before_calibration_runs(sd15_unet, passes):
    """The probe that slim() would fail runs before calibration: the run function is never called, the model is
    unchanged, and the error names the module and the way out. A processor that passes it calibrates."""
    from slimdiff_diffusers.core.calibrator import _sites_of_blocks

    unet = copy.deepcopy(sd15_unet)
    sites = sd.find_sites(unet)
    path = sites.attention[-1].name  # in the last pass when there are several
    processor = _SharedHeadDimProcessor()
    unet.get_submodule(path).set_processor(processor)
    state = {k: v.clone() for k, v in unet.state_dict().items()}
    processors = {n: m.processor for n, m in unet.named_modules() if isinstance(m, Attention)}
    config = sd.CalibrationConfig(propagation_probe_calls=0)
    if passes != "one pass":  # a limit that forces several passes: the refusal comes before the first one
        limit = max(sd.core.estimate_statistics_bytes(_sites_of_blocks(sites, [b]), config) for b in sites.blocks)
        config = sd.CalibrationConfig(propagation_probe_calls=0, memory_limit=limit)
    calls = []

    def run():  # the same forward passes on every call (passes repeat them)
        calls.append(1)
        gen = torch.Generator().manual_seed(0)
        unet(torch.randn(1, 4, 8, 8, generator=gen), 500, encoder_hidden_states=torch.randn(1, 7, 24, generator=gen))
    with pytest.raises(sd.UnsupportedAttentionProcessorError) as info:
        sd.calibrate(unet, run, config)
    message = str(info.value)
    assert isinstance(info.value, sd.UnsupportedProcessorError)  # what slim() raised for it before
    assert path in message and "_SharedHeadDimProcessor" in message and "slimdiff_compatible" in message
    assert "Nothing was run or changed" in message
    assert calls == []
    after = unet.state_dict()
    assert all(torch.equal(after[k], state[k]) for k in state)
    assert {n: m.processor for n, m in unet.named_modules() if isinstance(m, Attention)} == processors
    with pytest.raises(sd.UnsupportedAttentionProcessorError):
        sd.Calibrator(unet)  # the incremental API checks the same way
    # an undeclared processor that passes the probe is kept; so is one whose class declares compatibility
    unet.get_submodule(path).set_processor(_SlimAwareSubclass())
    sd.calibrate(unet, run, config)
    assert calls
    declared = type("Declared", (_SharedHeadDimProcessor,), {"slimdiff_compatible": True})
    unet.get_submodule(path).set_processor(declared())
    sd.calibrate(unet, run, config)


def test_stock_processors_are_replaced(sd15_unet, sd15_calibration):
    unet = copy.deepcopy(sd15_unet)
    unet.set_attn_processor(AttnProcessor())
    slimmed = sd.slim(unet, sd15_calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8)
    for path in slimmed.slimdiff_spec.attention:
        assert isinstance(slimmed.get_submodule(path).processor, LowRankAttnProcessor)
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    assert AttnProcessor2_0 is not None


@torch.no_grad()
def test_anime64_custom_processor_is_kept_and_works(anime64):
    unet, _ = anime64
    def processor_types(model):
        return {type(m.processor).__name__ for m in model.modules() if isinstance(m, Attention)}

    assert processor_types(unet) == {"NormResidualAttnProcessor"}
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    calibration = sd.calibrate(unet, lambda: unet(x, 150), sd.CalibrationConfig(propagation_probe_calls=0,
                                                                                 num_train_timesteps=300))
    slimmed = sd.slim(unet, calibration, keep_ratio=1.0, propagation="none")
    assert processor_types(slimmed) == {"NormResidualAttnProcessor"}
    ref, out = unet(x, 150).sample, slimmed(x, 150).sample
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4
    narrowed = sd.slim(unet, calibration, keep_ratio=0.5, propagation="none")
    attn = narrowed.get_submodule(calibration.sites.attention[0].name)
    assert attn.to_q.out_features < calibration.sites.attention[0].head_dim
    assert narrowed(x, 150).sample.isfinite().all()


class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """The ATen operations a call dispatches, by name."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def _ops(fn) -> list[str]:
    with torch.no_grad(), _OpLog() as log:
        fn()
    return log.ops


def _narrowed(attn: Attention, qk: int, v: int) -> Attention:
    """A copy of ``attn`` with ``qk`` q/k and ``v`` v/out channels per head (the first ones), scale unchanged."""
    attn = copy.deepcopy(attn)
    heads, dim = attn.heads, attn.to_q.out_features // attn.heads

    def rows(width):
        return torch.cat([torch.arange(h * dim, h * dim + width) for h in range(heads)])

    def cut(layer, index, dim_):
        new = torch.nn.Linear(layer.in_features if dim_ == 0 else len(index),
                              len(index) if dim_ == 0 else layer.out_features, bias=layer.bias is not None)
        new.weight.data = layer.weight.data.index_select(dim_, index).clone()
        if layer.bias is not None:
            new.bias.data = layer.bias.data.clone() if dim_ == 1 else layer.bias.data[index].clone()
        return new

    attn.to_q, attn.to_k = cut(attn.to_q, rows(qk), 0), cut(attn.to_k, rows(qk), 0)
    attn.to_v, attn.to_out[0] = cut(attn.to_v, rows(v), 0), cut(attn.to_out[0], rows(v), 1)
    return attn


@pytest.mark.parametrize("cross", [False, True])
def test_equal_widths_run_the_stock_operations(cross):
    """Where q/k and v keep one per-head width, LowRankAttnProcessor dispatches exactly AttnProcessor2_0's
    operations (no pad, no slice: nothing that costs a kernel launch on a GPU); with unequal widths it adds one
    pad per narrower operand and one copy (the output with its padding sliced off is not contiguous before the
    output projection), nothing else."""
    from collections import Counter

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8).eval()
    x = torch.randn(2, 10, 32)
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16)} if cross else {}
    for module in (attn, _narrowed(attn, 6, 6)):  # unslimmed, and slimmed to equal widths
        stock = _ops(lambda: AttnProcessor2_0()(module, x, **kw))
        assert _ops(lambda: LowRankAttnProcessor()(module, x, **kw)) == stock
    views = {"view", "_unsafe_view", "alias", "slice", "transpose", "t", "expand", "permute"}
    stock_compute = [op for op in _ops(lambda: AttnProcessor2_0()(attn, x, **kw)) if op not in views]
    for qk, v, pads in ((4, 6, 2), (6, 4, 1)):
        module = _narrowed(attn, qk, v)
        ops = _ops(lambda: LowRankAttnProcessor()(module, x, **kw))
        compute = Counter(op for op in ops if op not in views)
        assert compute - Counter(stock_compute) == Counter({"constant_pad_nd": pads, "clone": 1}), (qk, v, compute)
        assert not Counter(stock_compute) - compute, (qk, v, compute)


def test_slim_transformer_processors_run_the_stock_operations_on_equal_widths():
    """SlimFluxAttnProcessor / SlimJointAttnProcessor on unslimmed Flux and SD3 attentions: the same computing
    operations as diffusers' FluxAttnProcessor / JointAttnProcessor2_0, and no pad."""
    from collections import Counter

    from diffusers.models.attention_processor import JointAttnProcessor2_0
    from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

    from slimdiff_diffusers.diffusers_adapter.transformer_processors import (SlimFluxAttnProcessor,
                                                                             SlimJointAttnProcessor)

    torch.manual_seed(0)
    views = {"view", "_unsafe_view", "alias", "slice", "transpose", "t", "expand", "permute"}
    x, text = torch.randn(2, 10, 32), torch.randn(2, 5, 32)
    flux = FluxAttention(query_dim=32, heads=4, dim_head=8, added_kv_proj_dim=32, out_dim=32,
                         context_pre_only=False).eval()
    joint = Attention(32, cross_attention_dim=None, added_kv_proj_dim=32, dim_head=8, heads=4, out_dim=32,
                      context_pre_only=False, bias=True, processor=JointAttnProcessor2_0()).eval()
    for module, stock, slim in ((flux, FluxAttnProcessor(), SlimFluxAttnProcessor()),
                                (joint, JointAttnProcessor2_0(), SlimJointAttnProcessor())):
        expected = Counter(op for op in _ops(lambda: stock(module, x, text)) if op not in views)
        got = Counter(op for op in _ops(lambda: slim(module, x, text)) if op not in views)
        assert got == expected and "constant_pad_nd" not in got, type(slim).__name__
