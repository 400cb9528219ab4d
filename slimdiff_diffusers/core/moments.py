"""Accumulators for uncentered second moments of activations, kept per timestep bucket.

Each forward call adds ``XᵀX`` into an accumulator of ``accumulate_dtype`` (fp64 by default, method.md §2.2).
The products are fp32 on the activation's device and are added into the accumulator without an intermediate
copy. Two things keep this cheap (docs/decisions.md rows 13 and 21):

* **folds**: a call with fewer rows than an eighth of the accumulator's size allows (e.g. the 5120-wide FFN
  hidden states of SD1.5's 8×8 level) is copied into a row buffer, and the product is taken once per full
  buffer. Adding a ``d×d`` product into the accumulator costs as much memory traffic as a product over ``d/4``
  rows, so for short calls the addition, not the product, was the cost. A fold never spans two sampling
  trajectories (:meth:`MomentAccumulator.flush`), so split calibrations sum to the single run's moments;
* **upper blocks**: from two column blocks on (:func:`gram_block` wide) only the upper triangle of column blocks
  is computed (the lower blocks are filled in by :meth:`MomentAccumulator.freeze`).

Sums and token counts are kept per bucket, so any timestep weighting can be formed afterwards without re-running
the model.
"""
from __future__ import annotations

import torch

# Width of the column blocks of the upper-triangle Gram products, used from two blocks on
# (decisions.md row 21). On CPU, 128-wide blocks took 0.20–0.83 of the time of the whole
# product at every SD1.5 and default-model shape measured on one pinned core (the other one busy) (n×d from 1024×256 to
# 128×5120; 1024-wide blocks: 0.41–1.06), so CPU products use CPU_GRAM_BLOCK. Accelerators keep GRAM_BLOCK:
# many thin products mean many kernel launches there, and it was not re-measured.
GRAM_BLOCK = 1024
CPU_GRAM_BLOCK = 128
# A fold buffer holds at most this fraction of the accumulator's bytes (fp64: d/4 rows of fp32; freed at freeze).
FOLD_FRACTION = 1 / 8


def gram_block(device: torch.device | str) -> int:
    """Column-block width of the Gram products for activations on ``device``."""
    return CPU_GRAM_BLOCK if torch.device(device).type == "cpu" else GRAM_BLOCK


def add_upper_gram_(out: torch.Tensor, rows: torch.Tensor, block: int | None = None) -> None:
    """``out += rowsᵀ rows`` on the upper triangle of ``block``-wide column blocks (diagonal blocks whole).

    ``rows`` is ``(n, d)`` (fp32); ``out`` is ``(d, d)`` in any wider dtype, on any device: each block product is
    added with the cast fused into the addition. Below ``2·block`` columns the whole product is added. The
    strictly lower blocks of ``out`` are left untouched: call :func:`mirror_upper_blocks_` before reading them.
    """
    block = block or GRAM_BLOCK
    d = rows.shape[-1]
    if d < 2 * block:
        out += (rows.T @ rows).to(out.device)  # no-op unless the statistics live elsewhere (statistics_device)
        return
    for start in range(0, d, block):
        stop = min(start + block, d)
        out[start:stop, start:] += (rows[:, start:stop].T @ rows[:, start:]).to(out.device)


def mirror_upper_blocks_(xx: torch.Tensor, block: int | None = None) -> None:
    """Fill the strictly lower column blocks of each ``(d, d)`` matrix in ``xx (..., d, d)`` from the upper ones.

    The counterpart of :func:`add_upper_gram_` (a no-op below ``2·block`` columns). Idempotent: the lower blocks
    are overwritten, never added to, so accumulating more and mirroring again is correct.
    """
    block = block or GRAM_BLOCK
    d = xx.shape[-1]
    if d < 2 * block:
        return
    for start in range(0, d - block, block):
        stop = start + block
        xx[..., stop:, start:stop] = xx[..., start:stop, stop:].transpose(-1, -2)


class MomentAccumulator:
    """Running ``Σ xᵀx``, ``Σ x`` and token count of a ``d``-wide activation, per timestep bucket.

    While accumulating, ``xx`` may hold only the upper column blocks and some rows may wait in the fold buffer:
    read the moments through :meth:`freeze`.
    """

    def __init__(self, dim: int, num_buckets: int, dtype: torch.dtype, device: torch.device | str,
                 block: int | None = None):
        """``device`` holds the sums; ``block`` is the Gram column-block width (default: :func:`gram_block` of
        ``device``; the calibrator passes the one of the activations' device, where the products run)."""
        self.dim = dim
        self.block = block or gram_block(device)
        self.xx = torch.zeros(num_buckets, dim, dim, dtype=dtype, device=device)
        self.x = torch.zeros(num_buckets, dim, dtype=dtype, device=device)
        self.counts = [0.0] * num_buckets  # Python floats: a tensor op per layer and call costs more than the count
        # fp32 rows of the buffer = FOLD_FRACTION of the accumulator's bytes (fp64: d/4 rows).
        self.fold_rows = int(dim * torch.finfo(dtype).bits // 8 * FOLD_FRACTION // 4)
        self._buffer: torch.Tensor | None = None
        self._filled = 0
        self._buffer_bucket = 0

    @property
    def nbytes(self) -> int:
        return self.xx.numel() * self.xx.element_size() + self.x.numel() * self.x.element_size()

    @property
    def n(self) -> torch.Tensor:
        """Token count per bucket (fp64, on the accumulator's device)."""
        return torch.tensor(self.counts, dtype=torch.float64, device=self.x.device)

    def add(self, x: torch.Tensor, bucket: int) -> None:
        """Add the rows of ``x`` (any leading shape, last dim ``d``). The running sums ``x`` are what the
        calibrator's finite check reads."""
        rows = x.reshape(-1, self.dim).float()
        n = rows.shape[0]
        self.x[bucket] += rows.sum(0).to(self.x.device)
        self.counts[bucket] += n
        if self._filled and (bucket != self._buffer_bucket or self._filled + n > self.fold_rows):
            self.flush()
        if n >= self.fold_rows:
            add_upper_gram_(self.xx[bucket], rows, self.block)
            return
        if self._buffer is None or self._buffer.device != rows.device:
            self._buffer = torch.empty(self.fold_rows, self.dim, dtype=torch.float32, device=rows.device)
        self._buffer[self._filled:self._filled + n] = rows
        self._filled += n
        self._buffer_bucket = bucket

    @property
    def pending_rows(self) -> int:
        """Rows waiting in the fold buffer (not yet in ``xx``)."""
        return self._filled

    def flush(self) -> None:
        """Multiply out the rows waiting in the fold buffer, so that no fold spans this point.

        The calibrator calls it where a new sampling trajectory starts: a fold's fp32 product then never mixes
        two trajectories, and a calibration split between trajectories (prompt batches over ranks, files
        merged later) groups every product as the single run does, so the two agree to fp64 rounding.
        """
        if self._filled:
            add_upper_gram_(self.xx[self._buffer_bucket], self._buffer[:self._filled], self.block)
            self._filled = 0

    def freeze(self) -> torch.Tensor:
        """The complete ``Σ xᵀx`` per bucket: pending rows added, the fold buffer freed, the lower blocks
        mirrored in place. Accumulating may go on afterwards."""
        self.flush()
        self._buffer = None
        mirror_upper_blocks_(self.xx, self.block)
        return self.xx


class HeadBlockAccumulator:
    """The ``H`` diagonal ``d_h×d_h`` blocks of the second moment of a head-concatenated activation.

    Used for the attention output that feeds ``to_out[0]`` (the "P-aware" VO statistics, method.md §3.3b).
    """

    def __init__(self, heads: int, head_dim: int, num_buckets: int, dtype: torch.dtype, device: torch.device | str):
        self.heads, self.head_dim = heads, head_dim
        self.xx = torch.zeros(num_buckets, heads, head_dim, head_dim, dtype=dtype, device=device)
        self.x = torch.zeros(num_buckets, heads, head_dim, dtype=dtype, device=device)
        self.counts = [0.0] * num_buckets

    @property
    def nbytes(self) -> int:
        return self.xx.numel() * self.xx.element_size() + self.x.numel() * self.x.element_size()

    @property
    def n(self) -> torch.Tensor:
        return torch.tensor(self.counts, dtype=torch.float64, device=self.x.device)

    def add(self, u: torch.Tensor, bucket: int) -> None:
        rows = u.reshape(-1, self.heads, self.head_dim).float()
        self.xx[bucket] += torch.einsum("nhi,nhj->hij", rows, rows).to(self.xx.device)
        self.x[bucket] += rows.sum(0).to(self.x.device)
        self.counts[bucket] += rows.shape[0]


class EnergyAccumulator:
    """Mean squared norm per token (``E‖y‖²``) of a module output, per timestep bucket.

    The sums stay on the device of the activations they are given (moved there on first use), so an
    accelerator is never waited for; the counts are Python floats.
    """

    def __init__(self, num_buckets: int, device: torch.device | str):
        self.sum = torch.zeros(num_buckets, dtype=torch.float64, device=device)
        self.counts = [0.0] * num_buckets

    @property
    def n(self) -> torch.Tensor:
        return torch.tensor(self.counts, dtype=torch.float64, device=self.sum.device)

    def add(self, y: torch.Tensor, width: int, bucket: int, channel_dim: int = -1) -> None:
        # One pass without an n×d temporary (``y.pow(2).sum()`` made one and read it again).
        self.add_total(torch.linalg.vector_norm(y, dtype=torch.float32).square(), y.numel() / width, bucket)

    def add_total(self, total: torch.Tensor, count: float, bucket: int) -> None:
        """Add a precomputed sum over ``count`` tokens (e.g. the cosines of a block's tokens)."""
        if self.sum.device != total.device:
            self.sum = self.sum.to(total.device)
        self.sum[bucket] += total
        self.counts[bucket] += count


def bucket_weights(counts: torch.Tensor, weighting: str | list[float]) -> torch.Tensor:
    """Per-bucket weights for combining bucket means.

    ``"tokens"`` weights every token equally (uniform over sampling steps when each step processes the
    same batch, method.md §2.2); a list gives explicit weights per bucket (normalised, empty buckets
    dropped).
    """
    counts = counts.double()
    if weighting == "tokens":
        return counts / counts.sum().clamp_min(1.0)
    w = torch.as_tensor(weighting, dtype=torch.float64, device=counts.device)
    if w.numel() != counts.numel():
        raise ValueError(f"timestep weighting has {w.numel()} entries but the calibration has {counts.numel()} buckets")
    if (w < 0).any():
        raise ValueError("timestep weights must be non-negative")
    w = torch.where(counts > 0, w, torch.zeros_like(w))
    if w.sum() <= 0:
        raise ValueError("timestep weighting gives zero weight to every bucket that has data")
    return w / w.sum()


def combine_buckets(sums: torch.Tensor, counts: torch.Tensor, weighting: str | list[float]) -> torch.Tensor:
    """Weighted mean over buckets of ``sums[b] / counts[b]`` (bucket axis 0)."""
    w = bucket_weights(counts, weighting)
    if sums.shape[0] == 1:  # one bucket (the default): its mean, without three bucket-sized temporaries
        return sums[0] / counts.clamp_min(1.0)[0]
    means = sums / counts.clamp_min(1.0).reshape(-1, *([1] * (sums.dim() - 1)))
    return (means * w.reshape(-1, *([1] * (sums.dim() - 1)))).sum(0)


Index = slice | torch.Tensor


class AugmentedMoment:
    """The augmented second moment ``C = E[[x, 1][x, 1]ᵀ]`` ((m + 1)², fp64) of an ``m``-wide activation, built
    block by block from the calibration's sums, never as a whole unless asked (:meth:`full`).

    A decomposition of a 5120-wide feed-forward needs ``C`` three ways: its leading m×m block ridged (leverage
    scores), its rows in leverage order against the down projection (the error curve's cross terms), and ``C``
    permuted into leverage order (one Cholesky). Built from ``C`` each of these is a second (m + 1)² matrix;
    built from the sums (:meth:`block`) each is its own single allocation plus a few row blocks of at most
    ``block_bytes``. Index ``m`` is the constant channel (entries ``E[x]`` and ``1``).

    Values are exactly those of :func:`combine_buckets` on the sums (same operations, entry by entry), so any
    block equals the same block of :meth:`full`.
    """

    def __init__(self, sums: torch.Tensor, mean_sums: torch.Tensor, counts: torch.Tensor,
                 weighting: str | list[float] = "tokens", device: torch.device | str | None = None,
                 block_bytes: int = 2**22):
        """``sums`` (B, m, m) and ``mean_sums`` (B, m) are per-bucket sums of ``xxᵀ`` and ``x``, ``counts`` (B,)."""
        self.sums, self.mean_sums, self.counts, self.weighting = sums, mean_sums, counts, weighting
        self.m = sums.shape[-1]
        self.device = torch.device(device) if device is not None else sums.device
        self.block_bytes = block_bytes
        self._mean: torch.Tensor | None = None

    @property
    def size(self) -> int:
        """m + 1."""
        return self.m + 1

    def _combine(self, sums: torch.Tensor) -> torch.Tensor:
        """fp64 weighted mean over the bucket axis 0 of gathered sums (a fresh tensor)."""
        if self.counts.numel() == 1:  # one bucket: the same division as combine_buckets, without its temporaries
            return sums[0].double() / self.counts.double().clamp_min(1.0)[0]
        return combine_buckets(sums.double(), self.counts, self.weighting)

    def mean(self) -> torch.Tensor:
        """``[E[x], 1]`` (m + 1,), fp64 on the statistics' device."""
        if self._mean is None:
            self._mean = torch.cat([self._combine(self.mean_sums), self.mean_sums.new_ones(1, dtype=torch.float64)])
        return self._mean

    def _rows_per_block(self, columns: int) -> int:
        return max(1, self.block_bytes // (8 * max(columns, 1) * self.counts.numel()))

    def _fill(self, dest: torch.Tensor, first_row: int, cols: slice) -> None:
        """``dest[:] = C[first_row:first_row + len(dest), cols]`` for rows and columns inside the data part."""
        count = self.counts.double().clamp_min(1.0)[0]
        step = self._rows_per_block(dest.shape[-1])
        for start in range(0, dest.shape[0], step):
            stop = min(start + step, dest.shape[0])
            picked = self.sums[:, first_row + start:first_row + stop, cols]
            if self.counts.numel() == 1:  # copy, then divide in place: no temporary at all
                dest[start:stop].copy_(picked[0])
                dest[start:stop].div_(count)
            else:
                dest[start:stop] = self._combine(picked).to(self.device)

    def block(self, rows: Index, cols: Index) -> torch.Tensor:
        """``C[rows][:, cols]`` in one new (len(rows), len(cols)) fp64 tensor on ``device``.

        ``rows``/``cols`` are unit-step slices or index tensors into ``0 … m``; slices inside the data part are
        read as views, index tensors are gathered ``block_bytes`` of rows at a time.
        """
        m = self.m
        if isinstance(rows, slice) and isinstance(cols, slice):
            r0, r1, r_step = rows.indices(m + 1)
            c0, c1, c_step = cols.indices(m + 1)
            if r_step == c_step == 1 and r1 <= m and c1 <= m:
                out = torch.empty(max(r1 - r0, 0), max(c1 - c0, 0), dtype=torch.float64, device=self.device)
                self._fill(out, r0, slice(c0, c1))
                return out
        r = torch.arange(m + 1)[rows] if isinstance(rows, slice) else rows.to("cpu", torch.long)
        c = torch.arange(m + 1)[cols] if isinstance(cols, slice) else cols.to("cpu", torch.long)
        out = torch.empty(len(r), len(c), dtype=torch.float64, device=self.device)
        row_data = r.clamp(max=m - 1).to(self.sums.device)
        if isinstance(cols, slice) and cols.indices(m + 1)[2] == 1:  # columns c0 … c1 (and maybe the constant)
            c0, c1, _ = cols.indices(m + 1)
            source, data_cols, col_data = self.sums[..., c0:min(c1, m)], slice(0, max(min(c1, m) - c0, 0)), None
        else:
            source, data_cols, col_data = self.sums, slice(None), c.clamp(max=m - 1).to(self.sums.device)
        step = self._rows_per_block(source.shape[-1])
        for start in range(0, len(r), step):
            stop = min(start + step, len(r))
            picked = source.index_select(-2, row_data[start:stop])
            if col_data is not None:
                picked = picked.index_select(-1, col_data)
            out[start:stop, data_cols] = self._combine(picked).to(self.device)
            del picked
        # the constant channel: C[i, m] = C[m, i] = E[x_i], C[m, m] = 1
        mean = self.mean().to(self.device)
        const_cols, const_rows = (c == m).nonzero().flatten(), (r == m).nonzero().flatten()
        if len(const_cols):
            out[:, const_cols.to(self.device)] = mean[r.to(self.device)][:, None]
        if len(const_rows):
            out[const_rows.to(self.device), :] = mean[c.to(self.device)][None, :]
        return out

    def full(self) -> torch.Tensor:
        """The whole (m + 1)² matrix, in one allocation (``augment`` of the combined moment and mean)."""
        m = self.m
        out = torch.empty(m + 1, m + 1, dtype=torch.float64, device=self.device)
        self._fill(out[:m, :m], 0, slice(0, m))
        mean = self.mean().to(self.device)
        out[:m, m], out[m, :m], out[m, m] = mean[:m], mean[:m], 1.0
        return out


class MomentMatrix:
    """A held augmented moment matrix with the block interface of :class:`AugmentedMoment` (tests, small models)."""

    def __init__(self, matrix: torch.Tensor):
        self.matrix = matrix
        self.m = matrix.shape[-1] - 1

    @property
    def size(self) -> int:
        return self.m + 1

    def block(self, rows: Index, cols: Index) -> torch.Tensor:
        """``C[rows][:, cols]``, a new contiguous tensor."""
        picked = self.matrix[rows] if isinstance(rows, slice) else self.matrix.index_select(0, rows.to(self.matrix.device))
        picked = picked[:, cols] if isinstance(cols, slice) else picked.index_select(1, cols.to(self.matrix.device))
        return picked.clone(memory_format=torch.contiguous_format)

    def full(self) -> torch.Tensor:
        return self.matrix


MomentBlocks = AugmentedMoment | MomentMatrix
