"""Closed-form decompositions of the functional groups (MADAC, method.md §3).

* QK: per-head whitened SVD of the bilinear form ``W_q^h W_k^hᵀ`` (two-sided whitening).
* VO: per-head whitened SVD of ``W_v^h W_o^h`` (input whitening, or "P-aware" attention-output whitening).
* FFN: Nyström selection of hidden channels (output-aware greedy forward selection, or ridge leverage scores)
  + least-squares refit of the down projection.

Math uses row vectors (``y = x W + b`` with ``W = linear.weight.T``). Biases are handled exactly by augmenting
inputs with a constant 1: the augmented second moment is ``[[E xxᵀ, E x], [E xᵀ, 1]]``. Every decomposition
returns its exact relative calibration error for every rank (``errors[r]``, ``r = 0 … full``), and all
computations run in fp64.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .heap import release_free_heap
from .moments import MomentBlocks, MomentMatrix

DAMPING = 1e-6


def augment(xx: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Second moment of ``[x, 1]`` from ``E[xxᵀ]`` and ``E[x]``."""
    d = xx.shape[-1]
    out = xx.new_zeros(d + 1, d + 1)
    out[:d, :d] = xx
    out[:d, d] = x
    out[d, :d] = x
    out[d, d] = 1.0
    return out


def _augmented_weight(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Math weight ``[Wᵀ; b]`` of shape (d_in + 1, d_out), fp64 unless ``dtype`` says otherwise."""
    d_out, d_in = weight.shape
    out = torch.empty(d_in + 1, d_out, dtype=dtype, device=weight.device)  # one allocation, no cast temporary
    out[:d_in].copy_(weight.detach().T)
    if bias is None:
        out[d_in].zero_()
    else:
        out[d_in].copy_(bias.detach())
    return out


@dataclass
class LinearRef:
    """A Linear's weight and bias *by reference* (no copy), for decompositions that must rebuild weights later.

    Decompositions used to hold augmented copies of every attention and FFN weight until the rewrite (~10 GB
    for SDXL). They hold these references instead and form ``[Wᵀ; b]`` in fp64 one group at a time.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, weight: torch.Tensor, bias: torch.Tensor | None) -> LinearRef:
        return cls(weight.detach(), None if bias is None else bias.detach())

    def augmented(self, heads: int | None = None) -> torch.Tensor:
        """fp64 ``[Wᵀ; b]`` (d_in + 1, d_out), or per head (H, d_in + 1, dh) when ``heads`` is given."""
        w = _augmented_weight(self.weight, self.bias)
        return w if heads is None else _per_head(w, heads)


def _per_head(w: torch.Tensor, heads: int) -> torch.Tensor:
    """(d_in + 1, H·dh) → (H, d_in + 1, dh)."""
    return w.reshape(w.shape[0], heads, w.shape[1] // heads).permute(1, 0, 2)


def damped_cholesky(g: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Lower-triangular L with damp(G) = LLᵀ (batched), damp(G) = G + δ·(tr G / dim)·I.

    Statistics from few tokens are rank deficient and, after fp32 accumulation, can be slightly indefinite;
    the damping is then raised to 1e-4 and 1e-2 (method.md §3.4).
    """
    dim = g.shape[-1]
    scale = (torch.diagonal(g, dim1=-2, dim2=-1).sum(-1) / dim).clamp_min(1e-30)[..., None]
    for delta in (damping, 1e-4, 1e-2):
        # g + δ·scale·I, built with one copy of g (an identity matrix would be a second (m+1)² temporary)
        damped = g.clone()
        damped.diagonal(dim1=-2, dim2=-1).add_(delta * scale)
        lower, info = torch.linalg.cholesky_ex(damped)
        del damped
        if not info.any():
            return lower
    raise torch.linalg.LinAlgError("second moment is not positive definite even with 1e-2 damping")


def _damped_cholesky_upper(g: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Upper-triangular R with damp(G) = RᵀR."""
    return damped_cholesky(g, damping).transpose(-1, -2)


def _tail_errors(s: torch.Tensor) -> torch.Tensor:
    """Relative error for every rank r = 0..k from singular values ``s`` of shape (H, k), summed over heads."""
    energy = s.pow(2).sum(0)  # (k,)
    total = energy.sum().clamp_min(1e-300)
    kept = torch.cat([energy.new_zeros(1), energy.cumsum(0)])
    return ((total - kept) / total).clamp_min(0.0)


def reader_refit_maps(transform: torch.Tensor, moment: torch.Tensor, damping: float = DAMPING) -> torch.Tensor:
    """Least-squares reader maps ``M_h = (T_hᵀ G_h T_h)⁻¹ T_hᵀ G_h`` (H, r, dh) of narrowed head outputs (method.md §3.3.1).

    A head's narrowed output is ``u_h T_h`` (the value transform ``T_h`` acts before the softmax mixing, which is
    linear), so a reader of the heads (``to_out.0``, ``to_add_out``, a single-stream ``proj_out``) that kept
    ``W_h`` would best use ``M_h W_h``: it minimises ``E‖u_h W_h − u_h T_h O_h‖²`` over ``O_h`` for the head
    outputs ``u_h`` whose second moment is ``G_h = E[u_h u_hᵀ]`` (H, dh, dh). With ``G_h`` the value moment of the
    SVD's own whitening this is the SVD's factor ``Σ_r^{-1/2} U_rᵀ R``; with the reader's measured attention
    outputs it also sees the softmax mixing.

    ``G_h`` is damped (``+ δ·tr(G_h)/dh·I``) before the fit, not ``T_hᵀ G_h T_h``: head outputs can be rank
    deficient (a cross-attention's outputs lie in the span of a few text tokens' values), and a damped ``G_h``
    keeps the fit exact at full rank (``M_h = T_h⁻¹`` whatever ``G_h``) and defined in the directions the
    calibration never saw.
    """
    t = transform.to(moment.dtype)
    g = moment.clone()
    dh = g.shape[-1]
    g.diagonal(dim1=-2, dim2=-1).add_(damping * (torch.diagonal(g, dim1=-2, dim2=-1).sum(-1, keepdim=True) / dh)
                                      .clamp_min(1e-30))
    tg = t.transpose(1, 2) @ g  # (H, r, dh)
    return torch.cholesky_solve(tg, damped_cholesky(tg @ t, 0.0))


@dataclass
class QKDecomposition:
    """Factors of every head's bilinear form; :meth:`weights` truncates them to any rank."""

    q: LinearRef  # the original to_q / to_k, by reference
    k: LinearRef
    heads: int
    rq: torch.Tensor  # (H, dh, dh) upper
    rk: torch.Tensor
    u: torch.Tensor  # (H, dh, dh)
    s: torch.Tensor  # (H, dh)
    v: torch.Tensor  # (H, dh, dh)
    errors: torch.Tensor  # (dh + 1,)

    @property
    def full_rank(self) -> int:
        return self.s.shape[-1]

    def weights(self, rank: int) -> dict[str, torch.Tensor]:
        """Torch-layout weights/biases of the narrowed ``to_q`` and ``to_k`` (rows grouped per head)."""
        tq, tk = _qk_maps(self.rq, self.rk, self.u, self.s, self.v, rank)
        q = self.q.augmented(self.heads).to(tq.device) @ tq  # (H, d_in+1, r)
        k = self.k.augmented(self.heads).to(tk.device) @ tk
        return {
            "q.weight": q[:, :-1, :].permute(0, 2, 1).reshape(-1, q.shape[1] - 1),
            "q.bias": q[:, -1, :].reshape(-1),
            "k.weight": k[:, :-1, :].permute(0, 2, 1).reshape(-1, k.shape[1] - 1),
            "k.bias": k[:, -1, :].reshape(-1),
        }


def _qk_maps(rq: torch.Tensor, rk: torch.Tensor, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head maps T_q = R_q⁻¹ U_r Σ_r^½ and T_k = R_k⁻¹ V_r Σ_r^½ (method.md §3.2 step 4), (H, dh, r) each."""
    sq = s[:, :rank].sqrt()[:, None, :]
    return (torch.linalg.solve_triangular(rq, u[:, :, :rank] * sq, upper=True),
            torch.linalg.solve_triangular(rk, v[:, :, :rank] * sq, upper=True))


def decompose_qk(q_weight: torch.Tensor, q_bias: torch.Tensor | None, k_weight: torch.Tensor,
                 k_bias: torch.Tensor | None, heads: int, query_moment: torch.Tensor,
                 key_moment: torch.Tensor) -> QKDecomposition:
    """Whitened SVD of the per-head QK bilinear form (method.md §3.2).

    Args:
        q_weight, k_weight: torch weights (H·dh × d_in) of ``to_q``/``to_k``; biases may be None.
        heads: number of heads H.
        query_moment, key_moment: augmented second moments (d_in + 1)² of the query / key inputs.
    """
    wq = _per_head(_augmented_weight(q_weight, q_bias), heads)  # (H, d+1, dh) fp64
    wk = _per_head(_augmented_weight(k_weight, k_bias), heads)
    gq = wq.transpose(1, 2) @ query_moment @ wq
    gk = wk.transpose(1, 2) @ key_moment @ wk
    rq, rk = _damped_cholesky_upper(gq), _damped_cholesky_upper(gk)
    u, s, vh = torch.linalg.svd(rq @ rk.transpose(1, 2))
    return QKDecomposition(LinearRef.of(q_weight, q_bias), LinearRef.of(k_weight, k_bias), heads,
                           rq, rk, u, s, vh.transpose(1, 2), _tail_errors(s))


@dataclass
class VODecomposition:
    """Factors of every head's value-output product; :meth:`weights` truncates them to any rank."""

    v: LinearRef  # the original to_v, by reference
    heads: int
    r: torch.Tensor  # (H, dh, dh) upper, whitening of the head's value output
    u: torch.Tensor  # (H, dh, dh)
    s: torch.Tensor  # (H, dh)
    vt: torch.Tensor  # (H, dh, d_out)  rows of Vᵀ
    errors: torch.Tensor
    out: torch.Tensor | None = None  # the original output weight (torch layout d_out × H·dh), by reference

    @property
    def full_rank(self) -> int:
        return self.s.shape[-1]

    def transform(self, rank: int) -> torch.Tensor:
        """The value transform ``T = R⁻¹ U_r Σ_r^{1/2}`` (H, dh, r): narrowed values of head h are ``v_h T_h``."""
        return _value_transform(self.r, self.u, self.s, rank)

    def reader_maps(self, rank: int, reader_moments: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{"out": M}`` (H, r, dh): the narrowed reader is ``M_h W_o^h`` per head; the SVD's own factor, or the
        least-squares refit against ``reader_moments["out"]`` (:func:`reader_refit_maps`) when it is given."""
        if reader_moments and "out" in reader_moments:
            return {"out": reader_refit_maps(self.transform(rank), reader_moments["out"].to(self.r))}
        return {"out": _svd_reader_map(self.r, self.u, self.s, rank)}

    def weights(self, rank: int, reader_moments: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Torch-layout weights of the narrowed ``to_v`` (+bias) and ``to_out[0]`` (weight only).

        ``reader_moments``: ``{"out": G}`` (H, dh, dh) refits ``to_out[0]`` by least squares against the head
        outputs it reads (:func:`reader_refit_maps`); without it the SVD's own factor ``Σ_r^{1/2} V_rᵀ``.
        """
        sq = self.s[:, :rank].sqrt()
        t = self.transform(rank)
        v = self.v.augmented(self.heads).to(t.device) @ t  # (H, d_in+1, r)
        if reader_moments and "out" in reader_moments:
            if self.out is None:
                raise ValueError("this VO decomposition holds no output weight to refit")
            o = self.reader_maps(rank, reader_moments)["out"] @ _out_per_head(self.out, self.heads).to(t)
        else:
            o = sq[:, :, None] * self.vt[:, :rank, :]  # (H, r, d_out)
        return {
            "v.weight": v[:, :-1, :].permute(0, 2, 1).reshape(-1, v.shape[1] - 1),
            "v.bias": v[:, -1, :].reshape(-1),
            "out.weight": o.reshape(-1, o.shape[-1]).T.contiguous(),
        }


def decompose_vo(v_weight: torch.Tensor, v_bias: torch.Tensor | None, out_weight: torch.Tensor, heads: int,
                 value_moment: torch.Tensor | None = None,
                 head_output_moment: torch.Tensor | None = None) -> VODecomposition:
    """Whitened SVD of the per-head product ``W_v^h W_o^h`` (method.md §3.3).

    Exactly one of the statistics must be given:
        value_moment: augmented second moment of the value input (MoDeGPT Type-III, variant (a));
        head_output_moment: (H, dh, dh) second moment of each head's attention output (variant (b),
            "P-aware": includes the softmax mixing).
    """
    wv = _per_head(_augmented_weight(v_weight, v_bias), heads)
    dh = wv.shape[2]
    wo = out_weight.detach().double().T.reshape(heads, dh, -1)  # (H, dh, d_out)
    if (value_moment is None) == (head_output_moment is None):
        raise ValueError("pass exactly one of value_moment and head_output_moment")
    g = wv.transpose(1, 2) @ value_moment @ wv if value_moment is not None else head_output_moment.double()
    r = _damped_cholesky_upper(g)
    u, s, vt = torch.linalg.svd(r @ wo, full_matrices=False)
    return VODecomposition(LinearRef.of(v_weight, v_bias), heads, r, u, s, vt, _tail_errors(s), out_weight.detach())


def _value_transform(r: torch.Tensor, u: torch.Tensor, s: torch.Tensor, rank: int) -> torch.Tensor:
    """``T = R⁻¹ U_r Σ_r^{1/2}`` (H, dh, r), the per-head value transform of a VO decomposition."""
    return torch.linalg.solve_triangular(r, u[:, :, :rank] * s[:, :rank].sqrt()[:, None, :], upper=True)


def _svd_reader_map(r: torch.Tensor, u: torch.Tensor, s: torch.Tensor, rank: int) -> torch.Tensor:
    """The SVD's reader map ``Σ_r^{-1/2} U_rᵀ R`` (H, r, dh): ``Σ_r^{1/2} V_rᵀ = Σ_r^{-1/2} U_rᵀ R W_o`` (``R W_o =
    U Σ Vᵀ``). A zero singular value (a head whose output weights have rank < r) gets a zero row, which is what
    the slim weight has there as well."""
    sv = s[:, :rank]
    inv = torch.where(sv > 0, sv.clamp_min(1e-300).rsqrt(), torch.zeros_like(sv))
    return inv[:, :, None] * u[:, :, :rank].transpose(1, 2) @ r


def _out_per_head(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A reader's torch-layout weight (d_out × H·dh) as fp64 per-head math weights (H, dh, d_out)."""
    return weight.detach().double().T.reshape(heads, -1, weight.shape[0])


@dataclass
class FFNDecomposition:
    """Channel order (most useful first) and the statistics to refit the down projection for any width."""

    order: torch.Tensor  # (m,) channel indices, most important first
    # the augmented (m + 1)² hidden moment, as blocks (MomentMatrix / AugmentedMoment) or a loader returning them
    # (statistics read again for the refit); None once released
    moment: MomentBlocks | Callable[[], MomentBlocks] | None
    down: LinearRef  # the original down projection, by reference
    refit_bias: bool
    errors: torch.Tensor  # (m + 1,)

    @property
    def full_rank(self) -> int:
        return self.order.numel()

    def release_moment(self) -> None:
        """Drop the moment (or its loader): :meth:`weights` can no longer refit a narrowed width."""
        self.moment = None

    def moment_blocks(self) -> MomentBlocks:
        """The moment's blocks (the loader's answer when a loader is held)."""
        if self.moment is None:
            raise RuntimeError("the FFN moment was released: the refit needs it")
        return self.moment() if callable(self.moment) else self.moment

    def channels(self, width: int) -> torch.Tensor:
        return self.order[:width].sort().values

    def refit_index(self, width: int) -> torch.Tensor:
        """The rows/columns of C the refit of ``width`` channels reads: the kept channels (and the constant one)."""
        keep = self.channels(width)
        return torch.cat([keep, keep.new_tensor([self.full_rank])]) if self.refit_bias else keep

    def weights(self, width: int, damping: float = DAMPING, moment: MomentBlocks | None = None) -> dict[str, torch.Tensor]:
        """Kept channel indices and the least-squares refit down projection (torch layout).

        ``moment``: the moment's blocks, when the caller already holds them (default: :meth:`moment_blocks`).
        Only the blocks the refit reads are built: ``C_JJ`` ((|J|)²) and ``C[J, :]`` times the target, by rows.
        """
        m = self.full_rank
        keep = self.channels(width)
        full = self.down.augmented()
        if width == m:  # nothing dropped: the original weights are the exact answer, whatever the statistics
            return {"channels": keep, "down.weight": full[:m].T.contiguous(), "down.bias": full[m]}
        idx = self.refit_index(width)
        c = moment if moment is not None else self.moment_blocks()
        target = full if self.refit_bias else full[:m]
        rhs = _rows_times(c, idx, target)  # (|J|, d) = C[J, :n] @ target
        kept_bias = None if self.refit_bias else full[m].clone()
        del full, target
        sol = torch.cholesky_solve(rhs, cholesky_in_place(lambda: c.block(idx, idx), damping), out=rhs)
        down_bias = sol[-1] if self.refit_bias else kept_bias
        return {"channels": keep, "down.weight": sol[:width].T.contiguous(), "down.bias": down_bias}


def _rows_times(c: MomentBlocks, rows: torch.Tensor, target: torch.Tensor, block_bytes: int = 2**22) -> torch.Tensor:
    """``C[rows, :n] @ target`` (n = target rows), built from C's blocks a few rows at a time: never |rows| × n."""
    n = target.shape[0]
    out = torch.empty(len(rows), target.shape[1], dtype=torch.float64, device=target.device)
    step = max(1, block_bytes // (8 * n))
    for start in range(0, len(rows), step):
        stop = min(start + step, len(rows))
        torch.matmul(c.block(rows[start:stop], slice(0, n)), target, out=out[start:stop])
    return out


def cholesky_in_place(build: Callable[[], torch.Tensor], damping: float = DAMPING) -> torch.Tensor:
    """Lower Cholesky factor of damp(build()), factorised in the built matrix's own storage.

    Same numbers as :func:`damped_cholesky` (same damping ladder) with one matrix alive instead of three; for
    SD1.5's 5120-wide feed-forwards each (m + 1)² fp64 matrix is 210 MB. ``build`` is called again for each
    retry, since a failed factorisation leaves its matrix overwritten. ``build`` must return a symmetric matrix
    (the callers' principal submatrices of second moments are): its transposed view is then the same matrix in
    column-major order, which LAPACK factorises where it lies; a row-major ``out`` costs a full hidden copy.
    The factor returned is that column-major view.
    """
    for delta in (damping, 1e-4, 1e-2):
        a = build()
        scale = (torch.diagonal(a).sum() / a.shape[-1]).clamp_min(1e-30)
        a.diagonal().add_(delta * scale)
        if a.dim() == 2 and a.is_contiguous():
            a = a.mT
        info = torch.empty((), dtype=torch.int32, device=a.device)
        torch.linalg.cholesky_ex(a, out=(a, info))
        if not info.any():
            return a
        del a
    raise torch.linalg.LinAlgError("second moment is not positive definite even with 1e-2 damping")


def ridge_leverage_scores(c: torch.Tensor | Callable[[], torch.Tensor], ridge: float = 1e-2,
                          chunk: int = 256) -> torch.Tensor:
    """``ℓ_j = [C (C + λI)⁻¹]_jj`` with ``λ = ridge · tr(C)/m`` (method.md §3.1).

    ``c`` is the m×m moment, or a function that builds a fresh copy of it: then the one matrix built is ridged
    and factorised where it lies (a held ``c`` is cloned once). With C + λI = LLᵀ, ``[(C + λI)⁻¹]_jj = ‖L⁻¹e_j‖²``:
    computed ``chunk`` columns at a time, so no second m×m matrix (the inverse) is ever held.
    """
    build = c if callable(c) else c.clone
    pending = [build()]
    m = pending[0].shape[0]
    lam = ridge * torch.trace(pending[0]) / m

    def ridged() -> torch.Tensor:
        a = pending.pop() if pending else build()  # a retry (after a failed factorisation) builds it again
        a.diagonal().add_(lam)
        return a
    chol = cholesky_in_place(ridged, damping=0.0)
    inv_diag = torch.empty(m, dtype=chol.dtype, device=chol.device)
    for start in range(0, m, chunk):
        stop = min(m, start + chunk)
        unit = torch.zeros(m, stop - start, dtype=chol.dtype, device=chol.device)
        unit[torch.arange(start, stop), torch.arange(stop - start)] = 1.0
        inv_diag[start:stop] = torch.linalg.solve_triangular(chol, unit, upper=False).pow(2).sum(0)
    return 1.0 - lam * inv_diag


FFN_SELECTIONS = ("greedy", "leverage")
GREEDY_BLOCK = 32  # channels chosen per round of the greedy selection (one rank-b update of the whole moment)
GREEDY_POOL = 4  # each round chooses among the GREEDY_POOL · GREEDY_BLOCK best-scoring channels, exactly
_PIVOT_FLOOR = 1e-10  # a residual variance below this fraction of the channel's own is linear dependence


def decompose_ffn(down_weight: torch.Tensor, down_bias: torch.Tensor | None, hidden_moment: torch.Tensor,
                  hidden_mean: torch.Tensor, ridge: float = 1e-2, refit_bias: bool = True,
                  damping: float = DAMPING, selection: str = "greedy") -> FFNDecomposition:
    """Nyström channel selection for a feed-forward hidden layer and its exact error curve.

    Args:
        down_weight, down_bias: the down projection (torch layout d × m).
        hidden_moment, hidden_mean: E[aaᵀ] (m × m) and E[a] of the hidden activation a (input of down).
        ridge: relative ridge λ of the leverage scores (``selection="leverage"``).
        refit_bias: also refit the down bias (least squares with an intercept); otherwise the bias is kept
            and only the kept columns are refit (method.md's default).
        selection: ``"greedy"`` (method.md §3.1.1: each next channel is the one whose refit removes the most
            output error) or ``"leverage"`` (§3.1: top ridge leverage scores of the hidden moment alone).
    """
    return decompose_ffn_augmented(down_weight, down_bias, augment(hidden_moment.double(), hidden_mean.double()),
                                   ridge=ridge, refit_bias=refit_bias, damping=damping, selection=selection)


def decompose_ffn_augmented(down_weight: torch.Tensor, down_bias: torch.Tensor | None,
                            moment: torch.Tensor | MomentBlocks | Callable[[], MomentBlocks], ridge: float = 1e-2,
                            refit_bias: bool = True, damping: float = DAMPING,
                            selection: str = "greedy") -> FFNDecomposition:
    """:func:`decompose_ffn` from the augmented fp64 moment C = E[[a, 1][a, 1]ᵀ] ((m + 1)², see :func:`augment`).

    ``moment`` is the matrix, its blocks (:class:`~.moments.AugmentedMoment`: built from the statistics on demand),
    or a loader returning the blocks, which the decomposition keeps for the refit instead of the blocks. Every
    matrix the decomposition needs is built once, straight from the blocks, and factorised or updated where it
    lies. At most one (m + 1)² fp64 matrix exists at a time (210 MB for SD1.5's 5120-wide FFNs), beside
    (m + 1) × d cross terms.
    """
    if selection not in FFN_SELECTIONS:
        raise ValueError(f"selection must be one of {FFN_SELECTIONS}, got {selection!r}")
    if isinstance(moment, torch.Tensor):
        moment = MomentMatrix(moment)
    c = moment() if callable(moment) else moment
    m = c.size - 1
    target = _augmented_weight(down_weight, down_bias)  # (m+1, d)
    fit_target = target if refit_bias else target[:m]
    if selection == "greedy":
        order, explained, total = _greedy_order(c, fit_target)
    else:
        order, explained, total = _leverage_order(c, fit_target, ridge, damping)
    del target, fit_target
    release_free_heap()
    if refit_bias:  # prefix 0 = bias only; prefix k = bias + k channels
        kept = explained
    else:
        kept = torch.cat([explained.new_zeros(1), explained])
    errors = ((total - kept) / total.clamp_min(1e-300)).clamp(0.0, 1.0)
    errors[m] = 0.0  # at full width the original weights are kept (FFNDecomposition.weights)
    return FFNDecomposition(order, moment, LinearRef.of(down_weight, down_bias), refit_bias, errors)


def _leverage_order(c: MomentBlocks, fit_target: torch.Tensor, ridge: float,
                    damping: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels by descending ridge leverage (§3.1), the output energy each prefix explains and the total.

    ``explained[i]`` is what the first i channels explain (after the constant, first, when ``fit_target`` has the
    intercept row): one Cholesky of C in that order.
    """
    m = c.size - 1
    scores = ridge_leverage_scores(lambda: c.block(slice(0, m), slice(0, m)), ridge)
    order = torch.argsort(scores, descending=True)
    del scores
    release_free_heap()  # the leverage scores' chunk buffers, before the permuted moment is built
    perm = torch.cat([order.new_tensor([m]), order]) if fit_target.shape[0] > m else order
    cross = _rows_times(c, perm, fit_target)  # (|perm|, d) = C[perm, :n] @ fit_target, rows in leverage order
    total = sum((fit_target[perm[i:i + 256]] * cross[i:i + 256]).sum() for i in range(0, len(perm), 256))  # tr(TᵀCT)
    lower = cholesky_in_place(lambda: c.block(perm, perm), damping)
    z = torch.linalg.solve_triangular(lower, cross, upper=False, out=cross)  # in the cross terms' storage
    del lower
    return order, z.pow(2).sum(1).cumsum(0), total


def _greedy_order(c: MomentBlocks, fit_target: torch.Tensor, block: int = GREEDY_BLOCK,
                  pool: int = GREEDY_POOL) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Channels in the order of an output-aware greedy forward selection (method.md §3.1.1 [ours]).

    The refit error of a kept set J is tr(Tᵀ S_J T), S_J = C − C[:, J] C[J, J]⁻¹ C[J, :] the Schur complement
    (the part of the hidden activation the kept channels cannot explain). Adding channel j removes
    ‖(S_J T)_j‖² / (S_J)_jj of it, so each step adds the channel with the largest such gain. Rounds of ``block``
    channels: each picks them one at a time, exactly, among the ``pool · block`` best-scoring channels (their
    sub-matrix of S_J), then eliminates the block from the whole S_J and S_J T in one rank-``block`` update
    (one GEMM: the cost is that of one more Cholesky of C). The intercept, when ``fit_target`` has its row, is
    eliminated first: it is always kept.

    Returns the order, the output energy explained by each prefix (the intercept first, when fitted) and the
    total energy tr(TᵀCT), as :func:`_leverage_order` does.
    """
    m = c.size - 1
    n = fit_target.shape[0]
    schur = c.block(slice(0, n), slice(0, n))  # S_J, updated in place: the one n² matrix
    residual = schur @ fit_target  # (n, d) = S_J T
    total = (fit_target * residual).sum()
    own = schur.diagonal()[:m].clone()  # C_jj, for the dependence test
    floor = _PIVOT_FLOOR * own.clamp_min(_PIVOT_FLOOR * own.mean().clamp_min(1e-300))
    gains: list[torch.Tensor] = []
    if n > m:  # the intercept: always kept, eliminated first
        gains.append(_eliminate(schur, residual, torch.tensor([m], device=schur.device)))
    chosen = torch.zeros(m, dtype=torch.bool, device=schur.device)
    order: list[torch.Tensor] = []
    left = m
    while left:
        pivots = schur.diagonal()[:m]
        score = residual[:m].pow(2).sum(1) / pivots.clamp_min(1e-300)
        alive = ~chosen & (pivots > floor)
        if not alive.any():  # what is left is linearly dependent on the kept channels: it explains nothing
            rest = (~chosen).nonzero().squeeze(1)
            order.append(rest)
            gains.append(torch.zeros(len(rest), dtype=schur.dtype, device=schur.device))
            break
        score = torch.where(alive, score, torch.full_like(score, -1.0))
        candidates = torch.topk(score, min(pool * block, int(alive.sum()))).indices
        picked, picked_gains = _greedy_within(schur[candidates][:, candidates], residual[candidates],
                                              floor[candidates], block)
        picked = candidates[picked]
        _eliminate(schur, residual, picked)
        chosen[picked] = True
        order.append(picked)
        gains.append(picked_gains)
        left -= len(picked)
    del schur, residual
    explained = torch.cat(gains).cumsum(0)
    return torch.cat(order), explained, total


def _greedy_within(schur: torch.Tensor, residual: torch.Tensor, floor: torch.Tensor,
                   count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact greedy picks of up to ``count`` channels from a candidate pool (its own copies of S_J and S_J T)."""
    picked, gains = [], []
    available = torch.ones(schur.shape[0], dtype=torch.bool, device=schur.device)
    for _ in range(min(count, schur.shape[0])):
        pivots = schur.diagonal()
        score = residual.pow(2).sum(1) / pivots.clamp_min(1e-300)
        score = torch.where(available & (pivots > floor), score, torch.full_like(score, -1.0))
        j = int(score.argmax())
        if score[j] < 0:  # the rest of the pool depends on what was picked: the next round rescores everyone
            break
        gains.append(score[j])
        picked.append(j)
        available[j] = False
        column = schur[:, j] / pivots[j].sqrt()
        residual.sub_(torch.outer(column, residual[j] / pivots[j].sqrt()))
        schur.sub_(torch.outer(column, column))
    return torch.tensor(picked, dtype=torch.long, device=schur.device), torch.stack(gains)


def _eliminate(schur: torch.Tensor, residual: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Take channels ``index`` into the kept set: S ← S − S[:, J] S_JJ⁻¹ S[J, :] and S T likewise, in place.

    Returns the output energy each channel explains, in ``index`` order (‖row of L_JJ⁻¹ (S T)_J‖²).
    """
    lower, info = torch.linalg.cholesky_ex(schur[index][:, index])
    if info.any():  # rounding made a nearly dependent pick's pivot non-positive: take the block one at a time
        return torch.cat([_eliminate(schur, residual, index[i:i + 1]) if schur[index[i], index[i]] > 0
                          else schur.new_zeros(1) for i in range(len(index))])
    factor = torch.linalg.solve_triangular(lower, schur[index], upper=False)  # (b, n): L⁻¹ S[J, :]
    projected = torch.linalg.solve_triangular(lower, residual[index], upper=False)  # (b, d): L⁻¹ (S T)_J
    schur.addmm_(factor.T, factor, alpha=-1.0)
    residual.addmm_(factor.T, projected, alpha=-1.0)
    return projected.pow(2).sum(1)


# --------------------------------------------------------------------------------------------------
# Joint (MMDiT) attention: several streams share every head (method.md §8.2 [R/ours])
# --------------------------------------------------------------------------------------------------


def head_moment(ref: LinearRef, heads: int, input_moment: torch.Tensor) -> torch.Tensor:
    """(H, dh, dh) second moment of each head's projected vectors, ``W_hᵀ E[[x,1][x,1]ᵀ] W_h`` (fp64)."""
    w = ref.augmented(heads).to(input_moment.device)
    return w.transpose(1, 2) @ input_moment @ w


def pool_moments(moments: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Token-weighted mean of per-stream head moments: the moment of the concatenated token sequence."""
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("stream weights must sum to a positive number")
    return sum(m * (w / total) for m, w in zip(moments, weights))


def _per_head_weights(ref: LinearRef, heads: int, transform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch-layout (weight, bias) of a per-head projection followed by ``transform`` (H, dh, r)."""
    w = ref.augmented(heads).to(transform.device) @ transform  # (H, d_in+1, r)
    return w[:, :-1, :].permute(0, 2, 1).reshape(-1, w.shape[1] - 1), w[:, -1, :].reshape(-1)


@dataclass
class JointQKDecomposition:
    """QK of a joint attention: one per-head transform for every stream's queries, one for every stream's keys.

    Queries of all streams meet keys of all streams in one softmax, so a head's logits are ``q Tq Tkᵀ kᵀ``
    for any (query, key) stream pair: ``Tq`` must be shared by ``to_q``/``add_q_proj``, ``Tk`` by
    ``to_k``/``add_k_proj``. Whitening uses the pooled (token-weighted) moments of the head's query and key
    vectors over the streams, the moments of the concatenated sequences the softmax actually sees.
    """

    queries: dict[str, LinearRef]  # short name ("q", "add_q") -> original Linear, by reference
    keys: dict[str, LinearRef]
    heads: int
    rq: torch.Tensor
    rk: torch.Tensor
    u: torch.Tensor
    s: torch.Tensor
    v: torch.Tensor
    errors: torch.Tensor

    @property
    def full_rank(self) -> int:
        return self.s.shape[-1]

    def weights(self, rank: int) -> dict[str, torch.Tensor]:
        tq, tk = _qk_maps(self.rq, self.rk, self.u, self.s, self.v, rank)
        out: dict[str, torch.Tensor] = {}
        for refs, t in ((self.queries, tq), (self.keys, tk)):
            for name, ref in refs.items():
                out[f"{name}.weight"], out[f"{name}.bias"] = _per_head_weights(ref, self.heads, t)
        return out


def decompose_qk_joint(queries: dict[str, tuple[LinearRef, torch.Tensor, float]],
                       keys: dict[str, tuple[LinearRef, torch.Tensor, float]], heads: int) -> JointQKDecomposition:
    """Whitened SVD of a joint attention's bilinear form (method.md §8.2).

    Args:
        queries, keys: short name → (projection, augmented input moment, tokens per sample) per stream.
    """
    gq = pool_moments([head_moment(r, heads, m) for r, m, _ in queries.values()], [n for *_, n in queries.values()])
    gk = pool_moments([head_moment(r, heads, m) for r, m, _ in keys.values()], [n for *_, n in keys.values()])
    rq, rk = _damped_cholesky_upper(gq), _damped_cholesky_upper(gk)
    u, s, vh = torch.linalg.svd(rq @ rk.transpose(1, 2))
    return JointQKDecomposition({k: r for k, (r, *_) in queries.items()}, {k: r for k, (r, *_) in keys.items()},
                                heads, rq, rk, u, s, vh.transpose(1, 2), _tail_errors(s))


@dataclass
class JointVODecomposition:
    """VO of an attention whose value space several projections write and several output projections read.

    Joint attention: ``to_v`` (image tokens) and ``add_v_proj`` (text tokens) write a head's values, ``to_out[0]``
    (image queries) and ``to_add_out`` (text queries) read its output. One per-head transform ``T`` (dh × r)
    narrows every value projection; each output projection ``s`` gets ``O_s`` (r × d_s). ``outputs`` holds each
    reader's columns of the head output (a Linear's weight, or a column slice of it) and its token weight.
    """

    values: dict[str, LinearRef]
    output_weights: dict[str, float]  # short name -> token weight w_s of its queries
    output_columns: dict[str, int]  # short name -> d_s (columns of the joint SVD, in order)
    heads: int
    r: torch.Tensor  # (H, dh, dh) upper: whitening of the pooled head output
    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor  # (H, dh, Σ d_s)
    errors: torch.Tensor
    readers: dict[str, torch.Tensor] | None = None  # short name -> original output weight (d_s × H·dh), by reference

    @property
    def full_rank(self) -> int:
        return self.s.shape[-1]

    def transform(self, rank: int) -> torch.Tensor:
        """The value transform (H, dh, r) shared by every value projection."""
        return _value_transform(self.r, self.u, self.s, rank)

    def reader_maps(self, rank: int, reader_moments: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """``{reader: M}`` (H, r, dh) per output projection: the narrowed reader is ``M_h W_s^h``. The SVD gives
        every reader the same factor; a reader in ``reader_moments`` is refit against its own head outputs
        (:func:`reader_refit_maps`: ``to_out`` reads the image queries' outputs, ``to_add_out`` the text's)."""
        shared = _svd_reader_map(self.r, self.u, self.s, rank)
        t = self.transform(rank) if reader_moments else None
        return {name: reader_refit_maps(t, reader_moments[name].to(self.r))
                if reader_moments and name in reader_moments else shared for name in self.output_columns}

    def weights(self, rank: int, reader_moments: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Narrowed value projections (``<name>.weight/.bias``) and output projections (``<name>.weight``,
        torch layout d_s × H·r, heads grouped like the value rows); ``reader_moments`` (short name -> (H, dh, dh)
        moment of the head outputs that reader reads) refits those readers by least squares."""
        sq = self.s[:, :rank].sqrt()
        t = self.transform(rank)
        out: dict[str, torch.Tensor] = {}
        for name, ref in self.values.items():
            out[f"{name}.weight"], out[f"{name}.bias"] = _per_head_weights(ref, self.heads, t)
        o = sq[:, :, None] * self.vt[:, :rank, :]  # (H, r, Σ d_s)
        maps = self.reader_maps(rank, reader_moments) if reader_moments else {}
        start = 0
        for name, cols in self.output_columns.items():
            if name in (reader_moments or {}):
                if not self.readers or name not in self.readers:
                    raise ValueError(f"this VO decomposition holds no weight of reader {name!r} to refit")
                block = maps[name] @ _out_per_head(self.readers[name], self.heads).to(t)
            else:
                block = o[:, :, start:start + cols] / math.sqrt(self.output_weights[name])
            out[f"{name}.weight"] = block.reshape(-1, cols).T.contiguous()
            start += cols
        return out


def decompose_vo_joint(values: dict[str, LinearRef], outputs: dict[str, tuple[torch.Tensor, float]], heads: int,
                       head_output_moment: torch.Tensor) -> JointVODecomposition:
    """Whitened SVD of ``[√w_1 W_o1 | √w_2 W_o2 | …]`` per head (method.md §8.2 [R/ours]).

    Args:
        values: short name → value projection (``to_v``, ``add_v_proj``), by reference.
        outputs: short name → (output weight in torch layout d_s × H·dh, token weight w_s of the queries it reads).
        head_output_moment: (H, dh, dh) pooled second moment G of the head outputs (or of the values) over
            every stream; ``G = RᵀR``.

    Minimises ``Σ_s w_s ‖R (W_os − T O_s)‖²_F``: each reader's error weighted by its share of the tokens, under
    the pooled metric. Exact at full rank (``T O_s = W_os``).
    """
    dh = head_output_moment.shape[-1]
    blocks, weights, columns = [], {}, {}
    readers = {name: w.detach() for name, (w, _) in outputs.items()}
    for name, (w, share) in outputs.items():
        wo = w.detach().double().T.reshape(heads, dh, -1).to(head_output_moment.device)  # (H, dh, d_s)
        blocks.append(wo * math.sqrt(share))
        weights[name], columns[name] = float(share), wo.shape[-1]
    r = _damped_cholesky_upper(head_output_moment.double())
    u, s, vt = torch.linalg.svd(r @ torch.cat(blocks, dim=-1), full_matrices=False)
    return JointVODecomposition(dict(values), weights, columns, heads, r, u, s, vt, _tail_errors(s), readers)
