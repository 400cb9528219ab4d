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


# --- Transformer families (issue 10): every baseline slims the groups the core finds --------------------------

from tiny_models import flux_inputs, sd3_inputs, tiny_flux_transformer, tiny_sd3_transformer  # noqa: E402

TRANSFORMERS = {"flux": (tiny_flux_transformer, flux_inputs), "sd3": (tiny_sd3_transformer, sd3_inputs)}


@pytest.fixture(scope="module")
def transformer_calibrations():
    """family -> (model, inputs, BaselineCalibration); Flux: joint + single-stream blocks, RoPE, QK-norm (QK whole);
    SD3 without QK-norm (joint QK slimmed), its last block context_pre_only (no to_add_out, no ff_context)."""
    out = {}
    torch.set_num_threads(1)
    with torch.no_grad():
        for name, (make, inputs) in TRANSFORMERS.items():
            model = make()

            def run(model=model, inputs=inputs):
                for seed in range(4):
                    model(**inputs(model, seed=seed))
            out[name] = (model, inputs, bl.calibrate_with_extras(model, run, sd.CalibrationConfig(propagation_probe_calls=2)))
    return out


def _transformer_change(model, new, inputs) -> float:
    kw = inputs(model, seed=21)
    with torch.no_grad():
        ref, out = model(**kw)[0], new(**kw)[0]
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", list(TRANSFORMERS))
def test_transformer_compressible_params_match_slim_report(transformer_calibrations, family):
    model, _, cal = transformer_calibrations[family]
    slimmed = sd.slim(model, cal.calibration, keep_ratio=0.6, rank_multiple=2, ffn_multiple=8)
    report = slimmed.slimdiff_report
    assert bl.compressible_params(model, cal.sites) == report.compressible_params_before
    assert bl.compressible_params(slimmed, cal.sites) == report.compressible_params_after
    paths = {m.path for m in bl.targeted_matrices(cal.sites)}
    if family == "flux":
        assert "transformer_blocks.0.attn.add_v_proj" in paths and "transformer_blocks.0.attn.to_add_out" in paths
        assert "transformer_blocks.0.ff_context.net.0.proj" in paths
        assert "single_transformer_blocks.0.proj_out" in paths and "single_transformer_blocks.0.proj_mlp" in paths
        assert not any(p.endswith(("to_q", "add_q_proj")) for p in paths)  # QK-norm + RoPE: QK stays whole
    else:
        assert "transformer_blocks.0.attn.add_q_proj" in paths  # no QK-norm: joint QK is compressible
        assert "transformer_blocks.2.attn.to_add_out" not in paths  # context_pre_only block


def test_single_stream_needs_vo_and_ffn_together(transformer_calibrations):
    _, _, cal = transformer_calibrations["flux"]
    with pytest.raises(ValueError, match="proj_out"):
        bl.targeted_matrices(cal.sites, ("vo",))


@pytest.mark.parametrize("family", list(TRANSFORMERS))
@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_transformer_baseline_exact_at_keep_one(transformer_calibrations, family, name):
    model, inputs, cal = transformer_calibrations[family]
    new = bl.BASELINES[name](model, cal, 1.0)
    assert _transformer_change(model, new, inputs) < 1e-4


@pytest.mark.parametrize("family", list(TRANSFORMERS))
@pytest.mark.parametrize("name", list(bl.BASELINES))
def test_transformer_baseline_meets_budget(transformer_calibrations, family, name):
    model, inputs, cal = transformer_calibrations[family]
    before = [p.detach().clone() for p in model.parameters()]
    keep = 0.5
    try:
        new = bl.BASELINES[name](model, cal, keep)
    except sd.BudgetError:
        pytest.skip(f"{name} cannot reach keep {keep} on this tiny model (grid floors)")
    total, kept = bl.compressible_params(model, cal.sites), bl.compressible_params(new, cal.sites)
    assert kept <= keep * total + 1e-6
    assert kept >= (keep - 0.25) * total
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "the input model was modified"
    change = _transformer_change(model, new, inputs)
    assert 0 < change < 10 and change == change


@pytest.mark.parametrize("name", ["magnitude_pruning", "obs_pruning"])
def test_pruning_cuts_heads_in_both_streams_and_single_stream_columns(transformer_calibrations, name):
    model, inputs, cal = transformer_calibrations["flux"]
    new = bl.BASELINES[name](model, cal, 0.5)
    narrowed = 0
    for site in cal.sites.attention:
        attn = new.get_submodule(site.name)
        width = attn.to_v.out_features
        assert width % site.head_dim == 0  # whole heads (Flux processors reshape by head_dim)
        assert attn.to_q.out_features == attn.to_k.out_features == width
        if site.kind == "joint":
            assert attn.add_q_proj.out_features == attn.add_v_proj.out_features == width
            assert attn.to_out[0].in_features == attn.to_add_out.in_features == width
        else:
            block = new.get_submodule(site.name.rsplit(".", 1)[0])
            assert block.proj_out.in_features == width + block.proj_mlp.out_features
        narrowed += width < site.heads * site.head_dim
    assert narrowed or any(new.get_submodule(f.up).out_features < f.inner_dim * (2 if f.gated else 1)
                           for f in cal.sites.feed_forward)


def test_obs_reader_update_is_the_least_squares_refit():
    """Sequential OBS removal (saliency-ordered, Schur downdates) ends at the least-squares refit of the kept
    columns: W_K' = W H_:K H_KK⁻¹, the minimiser of E‖Wx − W_K' x_K‖² (damping 0)."""
    torch.manual_seed(3)
    x = torch.randn(600, 10, dtype=torch.float64) @ torch.randn(10, 10, dtype=torch.float64)
    w = torch.randn(6, 10, dtype=torch.float64)
    h = x.T @ x / len(x)
    reader = bl._ObsReader(w, h, damping=0.0)
    removed = [torch.tensor([2, 3]), torch.tensor([7])]
    predicted = reader.saliency(removed[0])
    error_before = ((x @ w.T) ** 2).sum() / len(x)
    for cols in removed:
        reader.remove(cols)
    keep = torch.tensor([0, 1, 4, 5, 6, 8, 9])
    refit = w @ h[:, keep] @ torch.linalg.inv(h[keep][:, keep])
    assert torch.allclose(reader.weight[:, keep], refit, atol=1e-8)
    assert not reader.weight[:, torch.cat(removed)].any()
    # The saliency of the first removal is its exact output error after the optimal update.
    one = bl._ObsReader(w, h, damping=0.0)
    one.remove(removed[0])
    actual = (((x @ w.T) - x @ one.weight.T) ** 2).sum() / len(x)
    assert actual == pytest.approx(predicted, rel=1e-6) and actual < error_before
