"""The benchmark baselines (benchmarks/baselines.py): exact at keep 1.0, budgets met, building blocks exact."""
from __future__ import annotations

import pytest
import torch
from conftest import ROOT, run_unet

import slimdiff_diffusers as sd

import sys

sys.path.insert(0, str(ROOT))
from benchmarks import baselines as bl  # noqa: E402

ALL = ("qk", "vo", "ffn")


@pytest.fixture(scope="module")
def baseline_calibration(sd15_unet):
    return bl.calibrate_with_extras(sd15_unet, run_unet(sd15_unet, batches=6))


def _inputs(seed: int = 123):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=gen), {"encoder_hidden_states": torch.randn(2, 7, 24, generator=gen)}


def _relative_change(a: torch.nn.Module, b: torch.nn.Module) -> float:
    x, kw = _inputs()
    with torch.no_grad():
        ref, out = a(x, 400, **kw).sample, b(x, 400, **kw).sample
    return ((out - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("targets", [ALL, ("qk", "vo")])
def test_compressible_params_match_slim_report(sd15_unet, baseline_calibration, targets):
    slimmed = sd.slim(sd15_unet, baseline_calibration.calibration, keep_ratio=0.6, targets=targets,
                      rank_multiple=2, ffn_multiple=8)
    report = slimmed.slimdiff_report
    sites = baseline_calibration.sites
    assert bl.compressible_params(sd15_unet, sites, targets) == report.compressible_params_before
    assert bl.compressible_params(slimmed, sites, targets) == report.compressible_params_after


@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_baseline_exact_at_keep_one(sd15_unet, baseline_calibration, name):
    new = bl.BASELINES[name](sd15_unet, baseline_calibration, 1.0)
    assert _relative_change(sd15_unet, new) < 1e-4
    assert bl.compressible_params(new, baseline_calibration.sites) == bl.compressible_params(sd15_unet, baseline_calibration.sites)


@pytest.mark.parametrize("name", list(bl.BASELINES))
@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_baseline_meets_budget(sd15_unet, baseline_calibration, name, keep):
    sites = baseline_calibration.sites
    before = [p.detach().clone() for p in sd15_unet.parameters()]
    new = bl.BASELINES[name](sd15_unet, baseline_calibration, keep)
    total = bl.compressible_params(sd15_unet, sites)
    kept = bl.compressible_params(new, sites)
    assert kept <= keep * total + 1e-6
    # Not absurdly far below the budget either (coarse units: heads, grid steps of the tiny model).
    assert kept >= (keep - 0.2) * total
    assert all(torch.equal(a, b) for a, b in zip(before, sd15_unet.parameters())), "the input model was modified"
    x, kw = _inputs()
    with torch.no_grad():
        assert torch.isfinite(new(x, 400, **kw).sample).all()


def test_factorisations_exact_at_full_rank(baseline_calibration):
    torch.manual_seed(0)
    w, b = torch.randn(12, 20, dtype=torch.float64), torch.randn(12, dtype=torch.float64)
    x = torch.randn(500, 20, dtype=torch.float64) + 0.5
    first, second = bl.svd_factors(w, 12)
    assert torch.allclose(second @ first, w, atol=1e-10)
    xx, mean = x.T @ x / len(x), x.mean(0)
    first, second, bias = bl.whitened_svd_factors(w, b, xx, mean, 12, damping=0.0)
    assert torch.allclose(x @ (second @ first).T + bias, x @ w.T + b, atol=1e-8)
    first, second, bias = bl.whitened_svd_factors(w, None, xx, mean, 12, damping=0.0)
    assert bias is None and torch.allclose(second @ first, w, atol=1e-8)


def test_whitened_svd_beats_plain_svd_in_its_metric():
    """At equal rank the whitened truncation has the smaller error on the calibration inputs (Eckart-Young)."""
    torch.manual_seed(1)
    w = torch.randn(16, 16, dtype=torch.float64)
    x = torch.randn(400, 16, dtype=torch.float64) * torch.logspace(0, -2, 16, dtype=torch.float64)
    xx, mean = x.T @ x / len(x), x.mean(0)
    f, s = bl.svd_factors(w, 4)
    fw, sw, _ = bl.whitened_svd_factors(w, None, xx, mean, 4)
    plain = (x @ (w - s @ f).T).norm()
    whitened = (x @ (w - sw @ fw).T).norm()
    assert whitened < plain


def test_magnitude_pruning_removes_heads_and_stubs_empty_attentions(sd15_unet, baseline_calibration):
    new = bl.magnitude_pruning(sd15_unet, baseline_calibration, 0.3, targets=("qk", "vo"))
    for site in baseline_calibration.sites.attention:
        attn = new.get_submodule(site.name)
        assert attn.to_q.out_features == attn.to_v.out_features == attn.to_out[0].in_features
        assert attn.to_q.out_features in (1, *[h * site.head_dim for h in range(1, site.heads + 1)])
        if attn.to_q.out_features == 1:  # a removed attention: zero stub, output = to_out bias
            assert attn.heads == 1 and not attn.to_v.weight.any() and not attn.to_out[0].weight.any()
        else:
            assert attn.heads == attn.to_q.out_features // site.head_dim


def test_modegpt_sparsity_allocation():
    bi = [0.01, 0.05, 0.2, 0.3, 0.02]
    sparsity = bl.allocate_global_sparsity(bi, 0.5, smoothing=0.05)
    assert sum(sparsity) / len(sparsity) == pytest.approx(0.5)
    assert max(sparsity) <= bl.MODEGPT_MAX_SPARSITY + 1e-12
    assert sparsity[0] >= sparsity[1] >= sparsity[2]  # low influence -> more sparsity


def test_modegpt_rank_pattern_uses_exact_group_names(sd15_unet, baseline_calibration):
    ranks, keep_of_block = bl.modegpt_rank_pattern(sd15_unet, baseline_calibration, 0.5)
    sites = baseline_calibration.sites
    names = {f"{s.name}:{k}" for s in sites.attention for k in ("qk", "vo")} | {f"{f.name}:ffn" for f in sites.feed_forward}
    assert set(ranks) == names
    assert set(keep_of_block) == set(sites.blocks)
