"""Site discovery: every SD-family group is found, unsupported modules are skipped with a reason."""
from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import CalibrationError


def test_sd15_like_groups(sd15_unet):
    sites = sd.find_sites(sd15_unet)
    blocks = [b for b in sites.blocks]
    assert len(sites.attention) == 2 * len(blocks) and len(sites.feed_forward) == len(blocks)
    assert all(f.gated and f.up.endswith("net.0.proj") and f.down.endswith("net.2") for f in sites.feed_forward)
    cross = [a for a in sites.attention if a.is_cross]
    assert len(cross) == len(blocks) and all(a.name.endswith("attn2") and a.kv_dim == 24 for a in cross)
    assert not sites.skipped


def test_sdxl_like_groups(sdxl_unet):
    sites = sd.find_sites(sdxl_unet)
    # 2 transformer layers per attention at the cross-attention level: down 1 attention, mid 1, up 2
    assert len(sites.blocks) == 2 * (1 + 1 + 2)
    assert {a.heads for a in sites.attention} == {4}


class _Joint(torch.nn.Module):
    """An SD3-style joint attention: extra projections for a second stream."""

    def __init__(self):
        super().__init__()
        self.attn = Attention(16, heads=2, dim_head=8, added_kv_proj_dim=16)


class _QKNorm(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention(16, heads=2, dim_head=8, qk_norm="layer_norm")


def test_unsupported_modules_are_skipped_with_a_reason():
    sites = sd.find_sites(_Joint())
    assert not sites.attention
    assert sites.skipped and "add_k_proj" in sites.skipped[0][1]
    with pytest.raises(CalibrationError, match="add_k_proj"):
        sd.calibrate(_Joint(), lambda: None)


def test_qk_norm_makes_qk_not_decomposable():
    site = sd.find_sites(_QKNorm()).attention[0]
    assert not site.qk_decomposable  # VO can still be slimmed; QK is left whole
