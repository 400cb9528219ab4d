"""What keeps slimming's memory bounded, and that it changes no result (decisions.md row 10).

FFN decompositions built from blocks of the statistics (AugmentedMoment) equal the previous full-matrix code.

The reference below is the FFN code before the blocks (2026-12-01, decisions.md row 10): leverage scores from
a ridged copy of the full augmented moment, cross terms from the full matrix, the permuted moment gathered from
it. The block code builds every matrix straight from the sums, so it sums in other orders: results must agree
to 1e-12 (relative, weights and maps; absolute, the error curve in [0, 1]) and give the same plan widths.
"""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import run_unet

import slimdiff_diffusers as sd
from slimdiff_diffusers.core import plan as plan_module
from slimdiff_diffusers.core import plan_slim
from slimdiff_diffusers.core.basis_maps import ffn_down_map
from slimdiff_diffusers.core.decompositions import (
    DAMPING,
    FFNDecomposition,
    LinearRef,
    _augmented_weight,
    augment,
    decompose_ffn_augmented,
)
from slimdiff_diffusers.core.moments import AugmentedMoment

SMALL = dict(rank_multiple=2, ffn_multiple=8)


# --- the previous implementation (reference) ---------------------------------------------------------------

def _old_cholesky(build, damping=DAMPING):
    for delta in (damping, 1e-4, 1e-2):
        a = build()
        scale = (torch.diagonal(a).sum() / a.shape[-1]).clamp_min(1e-30)
        a.diagonal().add_(delta * scale)
        lower, info = torch.linalg.cholesky_ex(a)
        if not info.any():
            return lower
    raise torch.linalg.LinAlgError("not positive definite")


def _old_leverage(c, ridge=1e-2):
    m = c.shape[0]
    lam = ridge * torch.trace(c) / m

    def ridged():
        a = c.clone()
        a.diagonal().add_(lam)
        return a
    chol = _old_cholesky(ridged, damping=0.0)
    inv_diag = torch.linalg.solve_triangular(chol, torch.eye(m, dtype=c.dtype), upper=False).pow(2).sum(0)
    return 1.0 - lam * inv_diag


class _OldFFN(FFNDecomposition):
    def weights(self, width, damping=DAMPING, moment=None):
        m = self.full_rank
        keep = self.channels(width)
        full = self.down.augmented()
        if width == m:
            return {"channels": keep, "down.weight": full[:m].T.contiguous(), "down.bias": full[m]}
        idx = self.refit_index(width)
        c = self.moment.full() if not callable(self.moment) else self.moment().full()
        target = full if self.refit_bias else full[:m]
        rhs = c[idx, : target.shape[0]] @ target
        sol = torch.cholesky_solve(rhs, _old_cholesky(lambda: c[idx[:, None], idx], damping))
        return {"channels": keep, "down.weight": sol[:width].T.contiguous(),
                "down.bias": sol[-1] if self.refit_bias else full[m]}


def _old_decompose(down_weight, down_bias, moment, ridge=1e-2, refit_bias=True, damping=DAMPING):
    blocks = moment() if callable(moment) else moment
    c = blocks.full()
    m = c.shape[0] - 1
    target = _augmented_weight(down_weight, down_bias)
    order = torch.argsort(_old_leverage(c[:m, :m], ridge), descending=True)
    perm = torch.cat([order.new_tensor([m]), order]) if refit_bias else order
    fit_target = target if refit_bias else target[:m]
    n = fit_target.shape[0]
    cross = (c[:, :n] @ fit_target)[perm]
    total = torch.einsum("id,ij,jd->", fit_target, c[:n, :n], fit_target)
    lower = _old_cholesky(lambda: c[perm[:, None], perm], damping)
    explained = torch.linalg.solve_triangular(lower, cross, upper=False).pow(2).sum(1).cumsum(0)
    kept = explained if refit_bias else torch.cat([explained.new_zeros(1), explained])
    errors = ((total - kept) / total.clamp_min(1e-300)).clamp(0.0, 1.0)
    errors[m] = 0.0
    return _OldFFN(order, moment, LinearRef.of(down_weight, down_bias), refit_bias, errors)


def _old_map(dec, width, damping=DAMPING):
    m = dec.full_rank
    c = dec.moment_blocks().full()
    idx = dec.refit_index(width)
    m_t = torch.cholesky_solve(c[idx, :m], _old_cholesky(lambda: c[idx[:, None], idx], damping))
    return m_t[:width].T.contiguous(), (m_t[width] if dec.refit_bias else None)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


# --- tests ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def calibrations(sd15_unet):
    """fp64 and fp32 accumulators, one and three timestep buckets."""
    out = {}
    for buckets in (1, 3):
        for dtype in (torch.float64, torch.float32):
            out[buckets, dtype] = sd.calibrate(sd15_unet, run_unet(sd15_unet, batches=3), sd.CalibrationConfig(
                num_timestep_buckets=buckets, accumulate_dtype=dtype, propagation_probe_calls=0))
    return out


@pytest.mark.parametrize("buckets", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_every_block_is_the_same_block_of_the_full_matrix(calibrations, buckets, dtype):
    calibration = calibrations[buckets, dtype]
    site = max(calibration.sites.feed_forward, key=lambda s: s.inner_dim)
    weighting = "tokens" if buckets == 1 else [0.2, 0.5, 0.3]
    blocks = calibration.augmented_input_blocks(site.hidden_key, weighting)
    blocks.block_bytes = 8 * blocks.size * 3  # a few rows per gather, so the row blocks are exercised
    full = blocks.full()
    m = blocks.m
    gen = torch.Generator().manual_seed(0)
    perm = torch.randperm(m + 1, generator=gen)
    subset = torch.cat([torch.randperm(m, generator=gen)[: m // 3].sort().values, torch.tensor([m])])
    cases = [(slice(0, m), slice(0, m)), (slice(3, m + 1), slice(0, m + 1)), (perm, perm), (subset, subset),
             (subset, slice(0, m)), (perm, slice(5, 17)), (slice(0, m + 1), perm)]
    for rows, cols in cases:
        expected = full[rows][:, cols]
        got = blocks.block(rows, cols)
        assert got.is_contiguous() and torch.equal(got, expected), (rows, cols)
    if buckets == 1:  # the accessor of the whole matrix is still augment() of the moment and mean
        assert torch.equal(full, augment(*calibration.input_moment(site.hidden_key, weighting)))


@pytest.mark.parametrize("refit_bias", [True, False])
@pytest.mark.parametrize("buckets", [1, 3])
def test_block_decomposition_equals_the_full_matrix_code(sd15_unet, calibrations, refit_bias, buckets):
    """Order identical; error curve within 1e-12; refit weights and LoRA maps within 1e-12 relative."""
    calibration = calibrations[buckets, torch.float64]
    for site in calibration.sites.feed_forward:
        down = sd15_unet.get_submodule(site.down)

        def loader(site=site) -> AugmentedMoment:
            blocks = calibration.augmented_input_blocks(site.hidden_key)
            blocks.block_bytes = 8 * blocks.size * 5
            return blocks
        new = decompose_ffn_augmented(down.weight, down.bias, loader, refit_bias=refit_bias, selection="leverage")
        old = _old_decompose(down.weight, down.bias, loader, refit_bias=refit_bias)
        assert torch.equal(new.order, old.order), site.name
        assert float((new.errors - old.errors).abs().max()) < 1e-12, site.name
        m = new.full_rank
        for width in (m, 3 * m // 4, m // 2, 8, 1):
            got, expected = new.weights(width), old.weights(width)
            assert torch.equal(got["channels"], expected["channels"])
            for key in ("down.weight", "down.bias"):
                assert _relative(got[key], expected[key]) < 1e-12, (site.name, width, key)
            if width < m:
                got_map, got_bias = ffn_down_map(new, width, block_bytes=8 * (width + 1) * 7)
                ref_map, ref_bias = _old_map(new, width)
                assert _relative(got_map, ref_map) < 1e-12
                assert (got_bias is None) == (not refit_bias)
                if refit_bias:
                    assert _relative(got_bias, ref_bias) < 1e-12


@pytest.mark.parametrize("refit_bias", [True, False])
def test_greedy_selection_from_blocks_equals_the_held_matrix(sd15_unet, calibrations, refit_bias):
    """The greedy selection (method.md §3.1.1) reads the blocks once: same order and curve as from the full matrix."""
    from slimdiff_diffusers.core.moments import MomentMatrix

    calibration = calibrations[3, torch.float64]
    for site in calibration.sites.feed_forward:
        down = sd15_unet.get_submodule(site.down)
        blocks = calibration.augmented_input_blocks(site.hidden_key)
        new = decompose_ffn_augmented(down.weight, down.bias, blocks, refit_bias=refit_bias, selection="greedy")
        held = decompose_ffn_augmented(down.weight, down.bias, MomentMatrix(blocks.full()), refit_bias=refit_bias,
                                       selection="greedy")
        assert torch.equal(new.order, held.order), site.name
        assert float((new.errors - held.errors).abs().max()) < 1e-12, site.name


@pytest.mark.parametrize("basis_maps", [False, True])
def test_plan_with_blocks_gives_the_previous_plan(sd15_unet, sd15_calibration, monkeypatch, basis_maps):
    """Same SlimSpec and every factor within 1e-12 of the plan made with the full-matrix FFN code."""
    new = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, basis_maps=basis_maps, ffn_selection="leverage",
                    **SMALL)
    monkeypatch.setattr(plan_module, "decompose_ffn_augmented",
                        lambda *a, selection, **kw: _old_decompose(*a, **kw))
    calibration = copy.copy(sd15_calibration)
    old = plan_slim(sd15_unet, calibration, keep_ratio=0.5, basis_maps=basis_maps, ffn_selection="leverage", **SMALL)
    assert new.spec.to_dict() == old.spec.to_dict()
    assert new.ranks == old.ranks
    for a, b in zip(new.groups, old.groups):
        assert a.predicted_error == pytest.approx(b.predicted_error, abs=1e-12)
        if a.kind == "ffn":
            assert a.factors.keys() == b.factors.keys()
            assert torch.equal(a.factors["channels"], b.factors["channels"])
            for key in set(a.factors) - {"channels", "down.input_map", "down.bias_map"}:
                assert _relative(a.factors[key], b.factors[key]) < 1e-6 if a.factors[key].dtype == torch.float32 \
                    else _relative(a.factors[key], b.factors[key]) < 1e-12


def test_free_heap_is_handed_back_where_the_c_library_can():
    """On glibc (this project's Linux machines and wheels) the trim is really wired; elsewhere it is a no-op."""
    import platform
    import sys

    from slimdiff_diffusers.core import heap

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert heap._MALLOC_TRIM is not None
    heap.release_free_heap()  # safe to call anywhere, any number of times
    heap.release_free_heap()


def test_plan_progress_counts_every_step_once(sd15_unet, sd15_calibration):
    """Feed-forwards are decomposed first and refit narrowest first: progress still counts each step once."""
    seen = []
    plan = plan_slim(sd15_unet, sd15_calibration, keep_ratio=0.5, progress=lambda d, t: seen.append((d, t)), **SMALL)
    total = len(sd15_calibration.sites.attention) + 2 * len(sd15_calibration.sites.feed_forward)
    assert seen == [(i, total) for i in range(1, total + 1)]
    assert [g.kind for g in plan.groups].count("ffn") == len(sd15_calibration.sites.feed_forward)
