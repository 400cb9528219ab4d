"""The closed-form decompositions: exact at full rank, exact error curves, better than data-free SVD."""
from __future__ import annotations

import pytest
import torch

from slimdiff_diffusers.core.decompositions import augment, decompose_ffn, decompose_qk, decompose_vo, reader_refit_maps


def _data(n=4000, d=24, seed=0, correlated=True):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64)
    if correlated:  # anisotropic activations, like real ones
        x = x @ torch.randn(d, d, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
        x = x + 0.3
    return x


def _moment(x):
    return augment(x.T @ x / x.shape[0], x.mean(0))


def _heads(w, h):
    return w.reshape(h, -1, w.shape[-1])


def test_qk_exact_at_full_rank_and_error_curve_matches():
    h, dh, d = 3, 8, 24
    gen = torch.Generator().manual_seed(1)
    wq, wk = torch.randn(h * dh, d, generator=gen, dtype=torch.float64), torch.randn(h * dh, d, generator=gen, dtype=torch.float64)
    bq = torch.randn(h * dh, generator=gen, dtype=torch.float64)
    x, y = _data(seed=2), _data(seed=3)
    dec = decompose_qk(wq, bq, wk, None, h, _moment(x), _moment(y))
    assert (dec.errors[1:] <= dec.errors[:-1] + 1e-12).all() and dec.errors[-1] < 1e-10

    def logits(q_w, q_b, k_w, k_b, r):
        q = (x @ q_w.T + q_b).reshape(-1, h, r)
        k = (y @ k_w.T + (k_b if k_b is not None else 0)).reshape(-1, h, r)
        return torch.einsum("nhr,mhr->hnm", q[:200], k[:200])

    ref = logits(wq, bq, wk, None, dh)
    full = dec.weights(dh)
    assert torch.allclose(logits(full["q.weight"], full["q.bias"], full["k.weight"], full["k.bias"], dh), ref, atol=1e-7)
    # The predicted relative error is the whitened (Kronecker) objective; it tracks the measured logit error.
    for r in (2, 4, 6):
        w = dec.weights(r)
        got = logits(w["q.weight"], w["q.bias"], w["k.weight"], w["k.bias"], r)
        measured = ((got - ref).pow(2).sum() / ref.pow(2).sum()).item()
        assert measured == pytest.approx(dec.errors[r].item(), rel=0.25)


def test_vo_exact_error_curve_both_variants():
    h, dh, d = 2, 8, 24
    gen = torch.Generator().manual_seed(4)
    wv, wo = torch.randn(h * dh, d, generator=gen, dtype=torch.float64), torch.randn(d, h * dh, generator=gen, dtype=torch.float64)
    x = _data(seed=5)
    dec = decompose_vo(wv, None, wo, h, value_moment=_moment(x))
    per_head_ref = [x @ _heads(wv, h)[i].T @ wo[:, i * dh:(i + 1) * dh].T for i in range(h)]
    total = sum(o.pow(2).sum() for o in per_head_ref)
    for r in (dh, 5, 2):
        w = dec.weights(r)
        v, o = _heads(w["v.weight"], h), w["out.weight"]
        err = sum(((x @ v[i].T + w["v.bias"].reshape(h, r)[i]) @ o[:, i * r:(i + 1) * r].T - per_head_ref[i]).pow(2).sum()
                  for i in range(h))
        # equal up to the 1e-6 relative damping of the whitening Cholesky
        assert (err / total).item() == pytest.approx(dec.errors[r].item(), abs=1e-8, rel=1e-4)
    # P-aware variant: head-output statistics give the same factors when they equal the value statistics.
    u = torch.stack([x @ _heads(wv, h)[i].T for i in range(h)])
    g = torch.einsum("hni,hnj->hij", u, u) / x.shape[0]
    dec_b = decompose_vo(wv, None, wo, h, head_output_moment=g)
    assert torch.allclose(dec_b.errors, dec.errors, atol=1e-6)


def test_vo_reader_refit_is_the_svd_factor_on_the_values_and_least_squares_on_mixed_outputs():
    """method.md §3.3.1: refit against the value moment itself, the reader map is the SVD's own factor; against
    head outputs that mix the values (softmax rows), it is the least-squares reader, so it never does worse on
    them, and both are exact at full rank."""
    h, dh, d, n = 2, 8, 24, 64 * 48
    gen = torch.Generator().manual_seed(6)
    wv, wo = torch.randn(h * dh, d, generator=gen, dtype=torch.float64), torch.randn(d, h * dh, generator=gen, dtype=torch.float64)
    x = _data(n=n, seed=7)
    dec = decompose_vo(wv, None, wo, h, value_moment=_moment(x))
    values = torch.stack([x @ _heads(wv, h)[i].T for i in range(h)])  # (H, n, dh)
    value_moment = torch.einsum("hni,hnj->hij", values, values) / n
    for r in (dh, 5, 2):
        svd = dec.reader_maps(r)["out"]
        refit = reader_refit_maps(dec.transform(r), value_moment)
        torch.testing.assert_close(refit, svd, rtol=1e-4, atol=1e-6 * svd.abs().max().item())
    # attention-like outputs: each token reads a softmax mixture of 64-token windows, which the value moment
    # does not describe
    logits = torch.randn(h, n // 64, 64, 64, generator=gen, dtype=torch.float64) * 2
    mixed = (logits.softmax(-1) @ values.reshape(h, n // 64, 64, dh)).reshape(h, n, dh)
    moment = torch.einsum("hni,hnj->hij", mixed, mixed) / n
    w_heads = wo.T.reshape(h, dh, d)

    def error(rank, reader_moments):
        w = dec.weights(rank, reader_moments)
        t, o = dec.transform(rank), w["out.weight"].T.reshape(h, rank, d)
        ref = mixed @ w_heads
        return float(((mixed @ t @ o - ref).pow(2).sum() / ref.pow(2).sum()))

    assert error(dh, {"out": moment}) < 1e-10 and error(dh, None) < 1e-10
    for r in (6, 4, 2):
        assert error(r, {"out": moment}) <= error(r, None) * (1 + 1e-9)
    assert error(4, {"out": moment}) < 0.95 * error(4, None)  # and here it does strictly better
    # the value side is the SVD's whatever the reader's fit
    assert torch.equal(dec.weights(4, {"out": moment})["v.weight"], dec.weights(4)["v.weight"])


@pytest.mark.parametrize("selection", ["greedy", "leverage"])
@pytest.mark.parametrize("refit_bias", [True, False])
def test_ffn_nystrom_error_curve_is_exact(refit_bias, selection):
    m, d = 32, 12
    gen = torch.Generator().manual_seed(6)
    a = torch.nn.functional.gelu(_data(n=3000, d=m, seed=7)) * 3
    wd, bd = torch.randn(d, m, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    dec = decompose_ffn(wd, bd, a.T @ a / a.shape[0], a.mean(0), refit_bias=refit_bias, selection=selection)
    ref = a @ wd.T + bd
    target = ref if refit_bias else a @ wd.T
    for k in (m, 24, 16, 4):
        w = dec.weights(k)
        got = a[:, w["channels"]] @ w["down.weight"].T + w["down.bias"]
        err = (got - ref).pow(2).sum() / target.pow(2).sum()
        assert err.item() == pytest.approx(dec.errors[k].item(), abs=1e-6, rel=1e-3)
    assert dec.errors[m] == 0.0
    assert (dec.errors[1:] <= dec.errors[:-1] + 1e-9).all()




def _refit_error(a: torch.Tensor, wd: torch.Tensor, bd: torch.Tensor, kept: list[int]) -> float:
    """Relative error of the least-squares refit (with intercept) of the FFN output from the ``kept`` channels."""
    ref = a @ wd.T + bd
    basis = torch.cat([a[:, kept], torch.ones(len(a), 1, dtype=a.dtype)], 1)
    fit = basis @ torch.linalg.lstsq(basis, ref).solution
    return float((fit - ref).pow(2).sum() / ref.pow(2).sum())


@pytest.mark.parametrize("block, pool", [(1, 64), (4, 1), (32, 4)])
def test_ffn_greedy_order_is_forward_selection_of_the_refit_error(block, pool):
    """Each next channel is the one whose refit lowers the output error most (checked by refitting every candidate
    with lstsq); with a pool of one block (pool=1) or rounds of several channels the picks may differ, but the order
    is a permutation and the curve stays the exact refit error of each prefix."""
    from slimdiff_diffusers.core.decompositions import _augmented_weight, _greedy_order
    from slimdiff_diffusers.core.moments import MomentMatrix

    m, d = 20, 6
    gen = torch.Generator().manual_seed(11)
    a = torch.nn.functional.gelu(_data(n=2000, d=m, seed=12)) * 2
    wd, bd = torch.randn(d, m, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    c = MomentMatrix(augment(a.T @ a / a.shape[0], a.mean(0)))
    order, explained, total = _greedy_order(c, _augmented_weight(wd, bd), block=block, pool=pool)
    assert sorted(order.tolist()) == list(range(m))
    errors = (total - explained) / total  # explained[0]: the intercept alone
    for k in (1, 3, 8, 15):
        assert errors[k].item() == pytest.approx(_refit_error(a, wd, bd, order[:k].tolist()), abs=1e-9)
    if (block, pool) == (1, 64):  # exact greedy: check every step against a brute-force search
        kept: list[int] = []
        for _ in range(8):
            best = min((j for j in range(m) if j not in kept), key=lambda j: _refit_error(a, wd, bd, kept + [j]))
            kept.append(best)
        assert order[:8].tolist() == kept


def test_ffn_greedy_selection_reads_the_down_projection():
    """Leverage keeps high-variance channels whatever the down projection does with them; the greedy selection
    drops the ones it ignores, so it is strictly better at the same width."""
    m, d = 16, 4
    gen = torch.Generator().manual_seed(5)
    a = torch.nn.functional.gelu(_data(n=3000, d=m, seed=9, correlated=False))
    a[:, :4] *= 30  # four loud channels...
    wd = torch.randn(d, m, generator=gen, dtype=torch.float64)
    wd[:, :4] = 0  # ...that the output never reads
    bd = torch.zeros(d, dtype=torch.float64)
    args = (wd, bd, a.T @ a / a.shape[0], a.mean(0))
    greedy, leverage = decompose_ffn(*args, selection="greedy"), decompose_ffn(*args, selection="leverage")
    assert set(leverage.channels(4).tolist()) == {0, 1, 2, 3}
    assert not set(greedy.channels(4).tolist()) & {0, 1, 2, 3}
    assert greedy.errors[4] < 0.8 * leverage.errors[4]
    with pytest.raises(ValueError, match="selection"):
        decompose_ffn(*args, selection="magnitude")


@pytest.mark.parametrize("refit_bias", [True, False])
def test_ffn_greedy_survives_dependent_and_dead_channels(refit_bias):
    """Duplicated and all-zero channels explain nothing once their twin is kept: no NaN, a monotone exact curve,
    and the original weights at full width."""
    m, d = 24, 5
    gen = torch.Generator().manual_seed(8)
    a = torch.nn.functional.gelu(_data(n=2000, d=m, seed=10))
    a[:, 5] = a[:, 4]  # a duplicate
    a[:, 6] = 2 * a[:, 1] - a[:, 2]  # a linear combination
    a[:, 7] = 0  # a dead channel
    wd, bd = torch.randn(d, m, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    dec = decompose_ffn(wd, bd, a.T @ a / a.shape[0], a.mean(0), refit_bias=refit_bias, selection="greedy")
    assert torch.isfinite(dec.errors).all() and (dec.errors[1:] <= dec.errors[:-1] + 1e-9).all()
    assert sorted(dec.order.tolist()) == list(range(m))
    assert dec.errors[m - 3].item() < 1e-9  # the three redundant channels are the last ones, and cost nothing
    assert set(dec.order[-3:].tolist()) & {4, 5} and 7 in dec.order[-3:].tolist()
    w = dec.weights(m - 3)
    got = a[:, w["channels"]] @ w["down.weight"].T + w["down.bias"]
    ref = a @ wd.T + bd
    assert float((got - ref).pow(2).sum() / ref.pow(2).sum()) < 1e-7  # exact but for the refit's 1e-6 damping
    assert torch.equal(dec.weights(m)["down.weight"], wd)

def test_ffn_released_moment_is_rebuilt_for_the_refit():
    from slimdiff_diffusers.core.moments import MomentMatrix

    m, d = 24, 8
    gen = torch.Generator().manual_seed(3)
    a = torch.nn.functional.gelu(_data(n=2000, d=m, seed=4))
    wd, bd = torch.randn(d, m, generator=gen, dtype=torch.float64), torch.randn(d, generator=gen, dtype=torch.float64)
    hh, h = a.T @ a / a.shape[0], a.mean(0)
    dec = decompose_ffn(wd, bd, hh, h)
    held = dec.weights(10)
    dec.moment = lambda: MomentMatrix(augment(hh.double(), h.double()))  # a loader: built again for the refit
    rebuilt = dec.weights(10)
    assert all(torch.equal(held[k], rebuilt[k]) for k in held)
    dec.release_moment()
    assert dec.moment is None
    with pytest.raises(RuntimeError, match="released"):
        dec.weights(10)
    assert torch.equal(dec.weights(m)["down.weight"], wd)  # full width needs no statistics


def test_ffn_gated_channels_keep_value_and_gate_halves_aligned(sd15_unet, sd15_calibration):
    import slimdiff_diffusers as sd

    slimmed = sd.slim(sd15_unet, sd15_calibration, keep_ratio=0.8, targets=("ffn",), ffn_multiple=8)
    for path, spec in slimmed.slimdiff_spec.feed_forward.items():
        site = next(s for s in sd15_calibration.sites.feed_forward if s.name == path)
        old_up, new_up = sd15_unet.get_submodule(site.up).weight, slimmed.get_submodule(site.up).weight
        m, k = spec.inner_dim, spec.width
        values, gates = new_up[:k], new_up[k:]
        # each kept value row j has its gate row m + j right behind it in the other half
        idx = [int((old_up[:m] == row).all(1).nonzero()[0]) for row in values]
        assert all(torch.equal(gates[i], old_up[m + j]) for i, j in enumerate(idx))


@torch.no_grad()
def test_whitened_beats_data_free_svd_on_anime64(anime64):
    """On the real trained model, activation-whitened QK/VO beat plain SVD of the same products (same rank)."""
    import slimdiff_diffusers as sd

    unet, scheduler = anime64
    scheduler.set_timesteps(4)

    def trajectory(seed):
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
        for t in scheduler.timesteps:
            yield x, t
            x = scheduler.step(unet(x, t).sample, t, x).prev_sample

    calibration = sd.calibrate(unet, lambda: [unet(x, t) for x, t in trajectory(0)],
                               sd.CalibrationConfig(propagation_probe_calls=0, num_train_timesteps=300))
    held_out: dict[str, list[torch.Tensor]] = {}
    sites = calibration.sites.attention
    hooks = [unet.get_submodule(s.q).register_forward_pre_hook(
        lambda m, a, name=s.name: held_out.setdefault(name, []).append(a[0].reshape(-1, a[0].shape[-1]).double()))
        for s in sites]
    list(trajectory(99))
    for h in hooks:
        h.remove()
    wins_qk = wins_vo = 0
    for site in sites:
        attn = unet.get_submodule(site.name)
        x = torch.cat(held_out[site.name])[::7]
        xx, mean = calibration.input_moment(site.q)
        c = augment(xx, mean)
        r = site.head_dim // 8
        # VO: whitened vs data-free truncated SVD of W_v W_o (rank r, same parameter count)
        wv, bv, wo = attn.to_v.weight.double(), attn.to_v.bias.double(), attn.to_out[0].weight.double()
        ref = (x @ wv.T + bv) @ wo.T
        w = decompose_vo(wv, bv, wo, 1, value_moment=c).weights(r)
        whitened = ((x @ w["v.weight"].T + w["v.bias"]) @ w["out.weight"].T - ref).norm()
        u, s, vh = torch.linalg.svd(wv.T @ wo.T)
        plain = ((x @ (u[:, :r] * s[:r]) @ vh[:r] + bv @ wo.T) - ref).norm()
        wins_vo += int(whitened < plain)
        # QK: logits x Wq Wkᵀ xᵀ, whitened vs plain SVD of the bilinear form
        wq, bq, wk, bk = (attn.to_q.weight.double(), attn.to_q.bias.double(), attn.to_k.weight.double(), attn.to_k.bias.double())
        xs = x[:256]
        ref_l = (xs @ wq.T + bq) @ (xs @ wk.T + bk).T
        w = decompose_qk(wq, bq, wk, bk, 1, c, c).weights(r)
        whitened = ((xs @ w["q.weight"].T + w["q.bias"]) @ (xs @ w["k.weight"].T + w["k.bias"]).T - ref_l).norm()
        aug_q, aug_k = torch.cat([wq.T, bq[None]]), torch.cat([wk.T, bk[None]])
        u, s, vh = torch.linalg.svd(aug_q @ aug_k.T)
        xa = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1)
        plain = (xa @ (u[:, :r] * s[:r]) @ vh[:r] @ xa.T - ref_l).norm()
        wins_qk += int(whitened < plain)
    assert wins_vo == len(sites), f"whitened VO beat plain SVD in {wins_vo}/{len(sites)} attention modules"
    assert wins_qk == len(sites), f"whitened QK beat plain SVD in {wins_qk}/{len(sites)} attention modules"
