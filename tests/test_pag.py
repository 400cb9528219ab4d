"""Perturbed-attention guidance (PAG) on slim UNets (issue 12): diffusers' PAG pipelines assign their identity
self-attention processors to the layers named by ``pag_applied_layers``; on slimmed modules these become SlimDiff's
slim PAG processors (same computation, separate q/k and v head widths, the original softmax scale)."""
from __future__ import annotations

import copy

import pytest
import torch
from diffusers import AutoPipelineForText2Image, StableDiffusionPAGPipeline
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0

import slimdiff_diffusers as sd
from slimdiff_diffusers.diffusers_adapter import LowRankAttnProcessor
from slimdiff_diffusers.diffusers_adapter.pag_processors import (
    SlimPAGCFGIdentitySelfAttnProcessor,
    SlimPAGIdentitySelfAttnProcessor,
)


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module")
def full_rank_slim(sd15_unet, sd15_calibration):
    full = {f"{s.name}:{k}": s.head_dim for s in sd15_calibration.sites.attention for k in ("qk", "vo")}
    return sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern=full)


@pytest.fixture(scope="module")
def narrow_slim(sd15_unet, sd15_calibration):
    return sd.slim(sd15_unet, sd15_calibration, targets=("qk", "vo"), rank_pattern={".*:qk": 4, ".*:vo": 6},
                   rank_multiple=2)


@pytest.mark.parametrize("stock, slim, chunks", [(PAGIdentitySelfAttnProcessor2_0, SlimPAGIdentitySelfAttnProcessor, 2),
                                                 (PAGCFGIdentitySelfAttnProcessor2_0,
                                                  SlimPAGCFGIdentitySelfAttnProcessor, 3)])
def test_slim_pag_processor_is_attention_plus_identity_path_on_narrow_heads(narrow_slim, stock, slim, chunks):
    """q/k narrower than v: the stock PAG processor fails there; the translated one computes, per batch part,
    exactly LowRankAttnProcessor (normal part) and to_out(to_v(x)) (perturbed part)."""
    unet = copy.deepcopy(narrow_slim)
    path = next(p for p in unet.slimdiff_spec.attention if p.endswith("attn1"))
    attn = unet.get_submodule(path)
    attn.processor = stock()  # what PAG's _set_pag_attn_processor does; the guarded module translates on use
    x = torch.randn(chunks, 6, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = attn(x)
        assert type(attn.processor) is slim
        normal = LowRankAttnProcessor()(attn, x[:-1])
        identity = attn.to_out[0](attn.to_v(x[-1:]))
    assert rel(out[:-1], normal) < 1e-6 and rel(out[-1:], identity) < 1e-6
    with pytest.raises(RuntimeError):  # why the translation exists: the stock processor on narrowed heads
        stock()(attn, x)


def _pag_images(tmp_path, unet, guidance_scale, **kwargs):
    from tiny_models import tiny_sd_pipeline

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.unet = copy.deepcopy(unet)
    pag = AutoPipelineForText2Image.from_pipe(pipe, enable_pag=True, pag_applied_layers=["down_blocks.0", "mid"])
    assert isinstance(pag, StableDiffusionPAGPipeline)
    pag.set_progress_bar_config(disable=True)
    before = {n: type(p) for n, p in pag.unet.attn_processors.items()}
    images = pag("a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
                 guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0), **kwargs).images
    assert {n: type(p) for n, p in pag.unet.attn_processors.items()} == before  # PAG restores the processors
    return images


@pytest.mark.parametrize("guidance_scale", [1.0, 5.0])  # PAG without and with classifier-free guidance
def test_pag_pipeline_on_a_full_rank_slim_unet_equals_stock_pag(tmp_path, sd15_unet, full_rank_slim, guidance_scale):
    original = _pag_images(tmp_path, sd15_unet, guidance_scale, pag_scale=3.0)
    slim = _pag_images(tmp_path, full_rank_slim, guidance_scale, pag_scale=3.0)
    without_pag = _pag_images(tmp_path, sd15_unet, guidance_scale, pag_scale=0.0)
    assert rel(original, without_pag) > 1e-3  # PAG does something here
    assert rel(slim, original) < 1e-4


def test_pag_pipeline_runs_on_narrowed_heads(tmp_path, narrow_slim):
    """Before: the stock PAG processors raise on q/k narrower than v."""
    with_pag = _pag_images(tmp_path, narrow_slim, 5.0, pag_scale=3.0)
    without = _pag_images(tmp_path, narrow_slim, 5.0, pag_scale=0.0)
    assert torch.isfinite(with_pag).all() and rel(with_pag, without) > 1e-3
