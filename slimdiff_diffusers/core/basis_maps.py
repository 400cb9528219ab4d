"""Basis maps: how each slimmed Linear's weight is a linear function of the original weight (method.md §3.5).

Slimming rewrites ``to_q``/``to_k``/``to_v``/``to_out.0`` and the feed-forward projections in new bases. Where
the slim weight is a *linear* function of the original weight, any update ΔW of the original (a LoRA) has an
exact image in the slim layer, the one the slimming would have produced from W + ΔW with the same bases:

=============  ===================================  ================================================
layer          slim weight (torch layout)           map stored here
=============  ===================================  ================================================
to_q/to_k/v    rows of head h: ``T_hᵀ · W[h]``      ``output`` (H, w, d_h): per-head left factor
to_out.0       cols of head h: ``W[:, h] · S_hᵀ``    ``input`` (H, d_h, w): per-head right factor
to_add_out     as to_out.0, its own ``S`` when refit   ``input`` under its own path when its ``S`` differs
                                                    from to_out.0's (format 3); else to_out.0's map
ff up          rows ``J`` (and ``m + J`` if gated)  ``rows`` (int64): the kept rows
ff down        ``[W_d | b_d] · M``                  ``input`` (m, k) = M[:m, :k] and ``bias`` (m,) =
                                                    M[:m, k] when the refit has an intercept
single-stream  ``[W_a[:, h] · S_hᵀ per head |``     ``attention_input`` (H, d_h, w) on the first H·d_h
proj_out       `` [W_m | b] · M]``                  columns and ``mlp_input`` (m, k) + ``bias`` (m,) on
                                                    the last m (each absent when its group kept the
                                                    columns as they are)
=============  ===================================  ================================================

``T`` includes the head layout (zero padding and the softmax-scale fold of the ``"uniform"`` layout), so the
maps describe the layers exactly as they were applied. ``S = Σ_r^{-1/2} U_rᵀ R`` is the VO map of ``to_out``
(``R W_o = U Σ Vᵀ``), or ``(T_hᵀ G_h T_h)⁻¹ T_hᵀ G_h`` when the reader was refit against the head outputs it reads
(``SlimConfig.vo_output_refit``, method.md §3.3.1); ``M = C[:, J] damp(C_JJ)⁻¹`` is the FFN refit. A Flux single-stream block's ``proj_out``
reads ``concat[attention heads, MLP]``, so its map is block-diagonal: the VO map on the heads' columns, the refit
on the MLP's; both are kept apart, since one dense map of that layer would be (H·d_h + m)² numbers.

This module is the one owner of the maps' file schema (:data:`LORA_MAPS_FILE`, the tensor keys, the metadata,
:data:`MAPS_FORMAT`) and of their validation. Maps without a reader of its own for ``to_add_out`` are written as
format ``"2"``, which is all they need, so that SlimDiff versions reading formats 1–2 still load them. Format ``"1"`` (before the single-stream ``proj_out`` maps) is still
read: its files held at most one of that layer's two parts, under ``input``, so those entries are dropped on load
and the layer is recorded in :attr:`BasisMaps.unmapped` (a LoRA on it is refused, naming the fix).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from .decompositions import (
    DAMPING,
    FFNDecomposition,
    JointVODecomposition,
    QKDecomposition,
    VODecomposition,
    cholesky_in_place,
)
from .errors import SlimFileError
from .io_utils import atomic_path
from .moments import MomentBlocks
from .rewrite import to_uniform_layout
from .sites import find_sites
from .spec import AttentionSpec, SlimSpec

if TYPE_CHECKING:
    from .plan import GroupPlan, SlimPlan

LORA_MAPS_FILE = "slimdiff_lora_maps.safetensors"
#: the format :meth:`BasisMaps.save` writes; "2" added the single-stream proj_out kinds, "3" a joint attention's
#: second-stream reader (``to_add_out``) with its own ``input`` map (refit readers, ``SlimConfig.vo_output_refit``),
#: which a format-2 reader would have mapped with ``to_out.0``'s
MAPS_FORMAT = "3"
#: the formats :meth:`BasisMaps.load` reads ("1": no single-stream proj_out maps, see the module docstring)
READABLE_MAPS_FORMATS = ("1", "2", "3")
_KINDS = ("output", "input", "rows", "bias", "attention_input", "mlp_input")


@dataclass
class BasisMaps:
    """The basis map of every slimmed Linear, keyed by the Linear's module path.

    Attributes:
        output: ``{path: (H, w, d_h)}`` for to_q/to_k/to_v: slim rows of head h = ``output[h] @ original rows``.
        input: ``{path: (H, d_h, w)}`` for to_out.0 (slim columns of head h = ``original columns @ input[h]``),
            and ``{path: (m, k)}`` for a narrowed feed-forward down projection (slim weight = ``W_d @ input``).
        rows: ``{path: (k,) or (2k,)}`` kept rows of a feed-forward up projection.
        bias: ``{path: (m,)}`` for a feed-forward down projection (or a single-stream proj_out's MLP columns)
            refit with an intercept: the slim bias gains ``W_d @ bias`` (``W_d``: the original MLP columns).
        attention_input: ``{path: (H, d_h, w)}`` for a single-stream block's proj_out: slim attention columns of
            head h = ``original columns of head h @ attention_input[h]`` (the first ``H·d_h`` columns).
        mlp_input: ``{path: (m, k)}`` for a single-stream block's proj_out whose MLP was narrowed: slim MLP
            columns = ``original MLP columns (the last m) @ mlp_input``.
        identity: paths of narrowed-spec Linears whose weights were kept as they are (full-width feed-forwards).
        unmapped: narrowed Linears these maps do not cover (single-stream proj_outs of a format-1 file).
    """

    output: dict[str, torch.Tensor] = field(default_factory=dict)
    input: dict[str, torch.Tensor] = field(default_factory=dict)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)
    bias: dict[str, torch.Tensor] = field(default_factory=dict)
    attention_input: dict[str, torch.Tensor] = field(default_factory=dict)
    mlp_input: dict[str, torch.Tensor] = field(default_factory=dict)
    identity: set[str] = field(default_factory=set)
    unmapped: set[str] = field(default_factory=set)

    def paths(self) -> set[str]:
        return set(self.output) | set(self.input) | set(self.rows) | set(self.attention_input) | \
            set(self.mlp_input) | self.identity

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kind in _KINDS for t in getattr(self, kind).values())

    # ---------------------------------------------------------------- file schema (one owner)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors keyed ``"<kind>:<module path>"`` (kinds: output, input, rows, bias, attention_input,
        mlp_input)."""
        out: dict[str, torch.Tensor] = {}
        for kind in _KINDS:
            for path, t in getattr(self, kind).items():
                out[f"{kind}:{path}"] = t.detach().cpu().contiguous()
        return out

    def save(self, path: str | Path, spec: SlimSpec) -> Path:
        """Write the maps next to a slim model (atomic); ``spec`` is recorded to check them against on load."""
        from safetensors.torch import save_file

        # the oldest format that holds these maps: "3" only for a second-stream reader with a map of its own
        written = MAPS_FORMAT if any(_attention_linear(p)[1] in _FIRST_STREAM for p in self.input) else "2"
        metadata = {"slimdiff.lora_maps.format": written, "slimdiff.spec": json.dumps(spec.to_dict()),
                    "slimdiff.lora_maps.identity": json.dumps(sorted(self.identity)),
                    # maps read from a format-1 file and saved again stay without the layers that file lacked
                    "slimdiff.lora_maps.unmapped": json.dumps(sorted(self.unmapped))}
        with atomic_path(path) as tmp:
            save_file(self.state_dict(), str(tmp), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, spec: SlimSpec | None = None) -> BasisMaps:
        """Read maps written by :meth:`save`; with ``spec``, check that they belong to that slim model."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                found = meta.get("slimdiff.lora_maps.format")
                if found not in READABLE_MAPS_FORMATS:
                    raise SlimFileError(f"{path} is not a SlimDiff LoRA-maps file of a format this version reads "
                                        f"({', '.join(READABLE_MAPS_FORMATS)}; found {found!r}): it was written by "
                                        "another SlimDiff version, or is not a maps file; save the slim model again "
                                        "with this version, or update SlimDiff")
                recorded = SlimSpec.from_dict(json.loads(meta["slimdiff.spec"]), source=f"{path} ('slimdiff.spec')")
                maps = cls(identity=set(json.loads(meta.get("slimdiff.lora_maps.identity", "[]"))),
                           unmapped=set(json.loads(meta.get("slimdiff.lora_maps.unmapped", "[]"))))
                kinds = _KINDS if found != "1" else _KINDS[:4]
                for key in f.keys():
                    kind, _, module = key.partition(":")
                    if kind not in kinds or not module:
                        raise SlimFileError(f"{path}: unknown entry {key!r}; the file was not written by SlimDiff")
                    getattr(maps, kind)[module] = f.get_tensor(key)
        except SlimFileError:
            raise
        except Exception as exc:  # safetensors' own errors for truncated / foreign files, bad JSON
            raise SlimFileError(f"{path}: the LoRA maps cannot be read ({type(exc).__name__}: {exc}); the file is "
                                "damaged: save the slim model again or re-download it") from exc
        if spec is not None and recorded.to_dict() != spec.to_dict():
            raise SlimFileError(f"{path} holds the LoRA maps of another slim model (its widths differ from this "
                                "model's slimdiff_spec); save the slim model again so the two match")
        if found == "1":
            # Format 1 kept one entry per Linear, so a single-stream proj_out (narrowed by VO and by the MLP refit)
            # got whichever of its two maps was written last, under `input`: not its map. Drop it.
            for proj_out in single_stream_readers(recorded):
                maps.input.pop(proj_out, None)
                maps.bias.pop(proj_out, None)
                maps.identity.discard(proj_out)
                maps.unmapped.add(proj_out)
        maps.check(recorded, str(path))
        return maps

    def check(self, spec: SlimSpec, source: str = "the LoRA maps") -> None:
        """Shapes against the spec: every map fits the widths of the layer it maps into."""
        problems = []
        for path, a in spec.attention.items():
            for name, width in (("to_q", a.qk_width), ("to_k", a.qk_width), ("to_v", a.vo_width)):
                t = self.output.get(f"{path}.{name}")
                if t is not None and tuple(t.shape) != (a.heads, width, a.head_dim):
                    problems.append(f"{path}.{name}: {tuple(t.shape)} instead of {(a.heads, width, a.head_dim)}")
            for name in ("to_out.0", "to_add_out"):
                t = self.input.get(f"{path}.{name}")
                if t is not None and tuple(t.shape) != (a.heads, a.head_dim, a.vo_width):
                    problems.append(f"{path}.{name}: {tuple(t.shape)} instead of {(a.heads, a.head_dim, a.vo_width)}")
        for path, t in (self.input | self.mlp_input).items():
            if t.ndim == 2:
                bias = self.bias.get(path)
                if bias is not None and tuple(bias.shape) != (t.shape[0],):
                    problems.append(f"{path} (bias map): {tuple(bias.shape)} instead of {(t.shape[0],)}")
        for proj_out, (attention, mlp) in single_stream_readers(spec).items():
            if proj_out in self.unmapped:
                continue
            # Each part narrowed must have its map: a missing part would read as "kept as it is".
            if attention is not None:
                a = spec.attention[attention]
                t = self.attention_input.get(proj_out)
                if t is None or tuple(t.shape) != (a.heads, a.head_dim, a.vo_width):
                    problems.append(f"{proj_out} (attention columns): "
                                    f"{'missing' if t is None else tuple(t.shape)} instead of "
                                    f"{(a.heads, a.head_dim, a.vo_width)}")
            if mlp is not None:
                f = spec.feed_forward[mlp]
                t = self.mlp_input.get(proj_out)
                if t is None or tuple(t.shape) != (f.inner_dim, f.width):
                    problems.append(f"{proj_out} (MLP columns): {'missing' if t is None else tuple(t.shape)} "
                                    f"instead of {(f.inner_dim, f.width)}")
        if problems:
            raise SlimFileError(f"{source} do not fit the slim model: {'; '.join(problems[:3])}; save the slim "
                                "model again")


def single_stream_readers(spec: SlimSpec) -> dict[str, tuple[str | None, str | None]]:
    """``{proj_out path: (attention path or None, feed-forward path or None)}`` of every single-stream block whose
    ``proj_out`` the spec changes: its attention columns when the block's attention is slimmed (a VO basis, even at
    full rank), its MLP columns when the block's MLP is narrowed (at full width the refit keeps the weights)."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for path, attention in spec.attention.items():
        if attention.kind == "single":
            out[f"{path.rpartition('.')[0]}.proj_out"] = (path, None)
    for path, f in spec.feed_forward.items():
        if f.kind == "single" and f.width < f.inner_dim:
            proj_out = f"{path}.proj_out"
            out[proj_out] = (out.get(proj_out, (None, None))[0], path)
    return out


# -------------------------------------------------------------------------------------------------- from a plan


def attention_maps(qk: QKDecomposition | None, qk_rank: int, vo: VODecomposition | JointVODecomposition | None,
                   vo_rank: int, spec: AttentionSpec,
                   vo_reader_moments: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Per-head maps of one attention's four projections as applied (layout included), fp64.

    Keys ``q k v`` → (H, w, d_h) left factors; ``out`` → (H, d_h, w) right factor, and ``add_out`` for a joint
    attention's second reader when it was refit apart (``vo_reader_moments``, the plan's ``GroupPlan.reader_moments``).
    An untargeted group maps by the identity (then padded / folded like its weights).
    """
    heads, dh = spec.heads, spec.head_dim
    eye = torch.eye(dh, dtype=torch.float64).expand(heads, dh, dh)
    if qk is not None:
        sq = qk.s[:, :qk_rank].sqrt()[:, None, :]
        tq = torch.linalg.solve_triangular(qk.rq, qk.u[:, :, :qk_rank] * sq, upper=True)  # (H, dh, r)
        tk = torch.linalg.solve_triangular(qk.rk, qk.v[:, :, :qk_rank] * sq, upper=True)
        q_map, k_map = tq.transpose(1, 2), tk.transpose(1, 2)  # (H, r, dh)
    else:
        q_map = k_map = eye
    add_out_map = None
    if vo is not None:
        v_map = vo.transform(vo_rank).transpose(1, 2)
        # the readers' maps M (H, r, dh): slim reader of head h = M_h W_o^h (the SVD's factor, or the refit)
        readers = vo.reader_maps(vo_rank, vo_reader_moments)
        out_map = readers["out"].transpose(1, 2)  # (H, dh, r)
        if vo_reader_moments and "add_out" in vo_reader_moments:
            add_out_map = readers["add_out"].transpose(1, 2)
    else:
        v_map, out_map = eye, eye
    # Same weight-layout tensors as the slim weights, so the layout conversion (padding, scale fold) is shared.
    weights = {"q.weight": q_map.reshape(-1, dh), "k.weight": k_map.reshape(-1, dh), "v.weight": v_map.reshape(-1, dh),
               "out.weight": out_map.permute(1, 0, 2).reshape(dh, -1)}
    for name, m in (("q", q_map), ("k", k_map), ("v", v_map)):
        weights[f"{name}.bias"] = torch.zeros(heads * m.shape[1], dtype=torch.float64)
    if spec.layout == "uniform":
        weights = to_uniform_layout(weights, spec)
    out = {name: weights[f"{name}.weight"].reshape(heads, -1, dh) for name in ("q", "k", "v")}
    out["out"] = weights["out.weight"].reshape(dh, heads, -1).permute(1, 0, 2)
    if add_out_map is not None:  # joint attention: separate layout only (plan_slim refuses "uniform" there)
        out["add_out"] = add_out_map
    return out


def ffn_down_map(decomposition: FFNDecomposition, width: int, damping: float = DAMPING,
                 moment: MomentBlocks | None = None, dtype: torch.dtype = torch.float64,
                 block_bytes: int = 2**22) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(M[:m, :k], M[:m, k] or None)`` with ``M = C[:, I] damp(C_II)⁻¹``, the right factor of the refit.

    ``I`` is the kept channels (plus the constant channel when the refit has an intercept), factorised exactly as
    :meth:`FFNDecomposition.weights` does (same matrix, same damping ladder), so ``[W_d | b_d] M`` is the refit.
    ``moment``: the moment's blocks when the caller holds them; ``dtype``: of the returned maps. The map is solved
    ``block_bytes`` of columns at a time into its final dtype, so no fp64 |I| × m matrix is held.
    """
    m = decomposition.full_rank
    c = moment if moment is not None else decomposition.moment_blocks()
    idx = decomposition.refit_index(width)
    chol = cholesky_in_place(lambda: c.block(idx, idx), damping)
    down_map = torch.empty(m, width, dtype=dtype, device=chol.device)
    bias_map = torch.empty(m, dtype=dtype, device=chol.device) if decomposition.refit_bias else None
    step = max(1, block_bytes // (8 * len(idx)))
    for start in range(0, m, step):
        stop = min(start + step, m)
        part = c.block(idx, slice(start, stop))
        torch.cholesky_solve(part, chol, out=part)  # (|I|, cols) = damp(C_II)⁻¹ C[I, cols] = M[cols, :]ᵀ
        down_map[start:stop] = part[:width].T
        if bias_map is not None:
            bias_map[start:stop] = part[width]
    return down_map, bias_map


def ffn_refit_with_map(decomposition: FFNDecomposition, width: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The FFN factors :func:`plan_slim` records (``decomposition.weights``), plus the down projection's basis map
    (``"down.input_map"``, ``"down.bias_map"``) when channels are dropped, from one load of the moment."""
    if width == decomposition.full_rank:  # the original weights are kept: the map is the identity
        return {k: (v if k == "channels" else v.to(dtype)) for k, v in decomposition.weights(width).items()}
    moment = decomposition.moment_blocks()
    factors = {k: (v if k == "channels" else v.to(dtype)) for k, v in decomposition.weights(width, moment=moment).items()}
    down_map, bias_map = ffn_down_map(decomposition, width, moment=moment, dtype=_map_dtype(dtype))
    factors["down.input_map"] = down_map.to("cpu")
    if bias_map is not None:
        factors["down.bias_map"] = bias_map.to("cpu")
    return factors


def _map_dtype(dtype: torch.dtype) -> torch.dtype:
    # Maps are stored in the model's dtype (a LoRA is applied in it anyway), but never below fp16/bf16.
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) else torch.float32


def plan_has_basis_maps(plan: SlimPlan) -> bool:
    """Whether every narrowed feed-forward of ``plan`` recorded its refit map (``plan_slim(basis_maps=True)``);
    attention maps come from the QK/VO factors, which every plan has."""
    return all("down.input_map" in g.factors or g.rank == g.full_rank for g in plan.groups if g.kind == "ffn")


def basis_maps_from_plan(plan: SlimPlan, dtype: torch.dtype = torch.float32) -> BasisMaps | None:
    """The basis maps of every Linear ``plan`` narrows (CPU, ``dtype``), or None when the plan was made without
    them (:func:`plan_has_basis_maps`)."""
    if not plan_has_basis_maps(plan):
        return None
    maps = BasisMaps()
    by_site: dict[str, list[GroupPlan]] = {}
    for group in plan.groups:
        by_site.setdefault(group.site.name, []).append(group)
    for name, groups in by_site.items():
        site = groups[0].site
        if name in plan.spec.attention:
            kinds = {g.kind: g for g in groups}
            qk, vo = kinds.get("qk"), kinds.get("vo")
            a = attention_maps(qk.factors if qk else None, qk.rank if qk else 0,
                               vo.factors if vo else None, vo.rank if vo else 0, plan.spec.attention[name],
                               vo.reader_moments if vo else None)
            for short, linear in (("q", site.q), ("k", site.k), ("v", site.v)):
                maps.output[linear] = a[short].to(dtype).contiguous()
            # a single-stream block's proj_out also holds the MLP's columns: its heads' map is kept apart
            (maps.attention_input if site.kind == "single" else maps.input)[site.out] = a["out"].to(dtype).contiguous()
            if "add_out" in a:  # a second reader refit apart from to_out.0 has its own map
                maps.input[site.add_out] = a["add_out"].to(dtype).contiguous()
        elif name in plan.spec.feed_forward:
            group, f_spec = groups[0], plan.spec.feed_forward[name]
            keep = group.factors["channels"].cpu()
            single = site.kind == "single"
            if group.rank == group.full_rank:  # full width: the weights are kept as they are
                # (a single-stream proj_out's attention columns may still change: its map says so, not this)
                maps.identity.update((site.up,) if single else (site.up, site.down))
                continue
            maps.rows[site.up] = torch.cat([keep, keep + f_spec.inner_dim]) if f_spec.gated else keep.clone()
            (maps.mlp_input if single else maps.input)[site.down] = group.factors["down.input_map"].to(dtype)
            if "down.bias_map" in group.factors:
                maps.bias[site.down] = group.factors["down.bias_map"].to(dtype)
    return maps


# ---------------------------------------------------------------------------------------------- LoRA factors


def translate_lora_factors(path: str, role: str, a: torch.Tensor, b: torch.Tensor, maps: BasisMaps,
                           lora_bias: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One LoRA update ``ΔW = B A`` (``a``: r×d_in, ``b``: d_out×r) of the original Linear ``path``, in the slim
    layer's bases (module docstring; method.md §3.5). The LoRA's scale (alpha/r) is not applied here.

    ``role`` is the Linear's part: ``"q"``, ``"k"``, ``"v"``, ``"out"`` (attention), ``"up"``, ``"down"``
    (feed-forward), ``"single_out"`` (a single-stream block's proj_out). Returns ``(A', B', lora_bias',
    bias_delta)``: the slim factors (same rank, same dtypes), the image of a ``lora_B`` bias when there is one, and
    for a down projection (or a single-stream proj_out's MLP part) refit with an intercept the unscaled update of
    the slim layer's bias, ``B A M_b`` (else None). Used by the diffusers hook and the ComfyUI LoRA node.

    A LoRA has no bias of its own (unless PEFT's ``lora_bias``): its update of a refit layer is ``[ΔW | 0]``, whose
    image through the refit ``[W | b] M`` is ``ΔW M[:m, :k]`` on the weight and ``ΔW M[:m, k]`` on the bias (the
    intercept column). A ``lora_B`` bias Δb on such a layer would map to ``Δb M[m, :]``, a rank-one weight term a
    LoRA cannot carry, so it is refused (``ValueError``), as for a feed-forward down projection.
    """
    compute = torch.float64
    new_bias, bias_delta = None, None
    path = lora_map_key(path, maps)
    if role in ("q", "k", "v"):
        t = maps.output[path].to(compute)  # (H, w, dh)
        heads, width, dh = t.shape
        b_new = torch.einsum("hwd,hdr->hwr", t, b.to(compute).reshape(heads, dh, -1)).reshape(heads * width, -1)
        a_new, b_new = a, b_new.to(b.dtype)
        if lora_bias is not None:
            new_bias = torch.einsum("hwd,hd->hw", t, lora_bias.to(compute).reshape(heads, dh)).reshape(-1) \
                .to(lora_bias.dtype)
    elif role == "out":
        s = maps.input[path].to(compute)  # (H, dh, w)
        heads, dh, width = s.shape
        a_new = torch.einsum("rhd,hdw->rhw", a.to(compute).reshape(a.shape[0], heads, dh), s) \
            .reshape(a.shape[0], -1).to(a.dtype)
        b_new, new_bias = b, lora_bias  # the output side is unchanged
    elif role == "up":
        rows = maps.rows[path].to(b.device)
        a_new, b_new = a, b[rows].contiguous()
        new_bias = lora_bias[rows].contiguous() if lora_bias is not None else None
    elif role == "down":  # A' = A M; the intercept's share of the update, B A M_b, moves the bias
        if lora_bias is not None:
            raise ValueError(f"{path}: a lora_B bias on a narrowed feed-forward down projection has no image")
        m = maps.input[path].to(compute)
        a64 = a.to(compute)
        a_new, b_new = (a64 @ m).to(a.dtype), b
        if path in maps.bias:
            bias_delta = (b.to(compute) @ (a64 @ maps.bias[path].to(compute))).to(b.dtype)
    elif role == "single_out":
        # proj_out reads [heads | MLP]: A = [A_a | A_m] -> [A_a S_hᵀ per head | A_m M]; the MLP part moves the
        # bias as a down projection's does. A part without a map kept its columns (maps.check saw to that).
        heads_map, mlp_map = maps.attention_input.get(path), maps.mlp_input.get(path)
        if lora_bias is not None and mlp_map is not None:
            raise ValueError(f"{path}: a lora_B bias on a narrowed feed-forward down projection has no image")
        a64 = a.to(compute)
        d_attn = heads_map.shape[0] * heads_map.shape[1] if heads_map is not None else a.shape[1] - mlp_map.shape[0]
        a_attn, a_mlp = a64[:, :d_attn], a64[:, d_attn:]
        if heads_map is not None:
            s = heads_map.to(compute)  # (H, dh, w)
            heads, dh, _ = s.shape
            a_attn = torch.einsum("rhd,hdw->rhw", a_attn.reshape(a.shape[0], heads, dh), s).reshape(a.shape[0], -1)
        if mlp_map is not None:
            if path in maps.bias:
                bias_delta = (b.to(compute) @ (a_mlp @ maps.bias[path].to(compute))).to(b.dtype)
            a_mlp = a_mlp @ mlp_map.to(compute)
        a_new, b_new, new_bias = torch.cat([a_attn, a_mlp], dim=1).to(a.dtype), b, lora_bias
    else:
        raise ValueError(f"unknown narrowed-Linear role {role!r} for {path}")
    return a_new, b_new, new_bias, bias_delta


def _base_layer(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module  # a PEFT-wrapped Linear


# The Linears of an attention module that slimming narrows, and their part. A joint attention's second stream
# (add_*_proj, to_add_out) shares every head's basis with the first (method.md §8), so it uses the first
# stream's map (:func:`lora_map_key`).
_ATTENTION_LINEARS = {"to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "out",
                      "add_q_proj": "q", "add_k_proj": "k", "add_v_proj": "v", "to_add_out": "out"}
_FIRST_STREAM = {"add_q_proj": "to_q", "add_k_proj": "to_k", "add_v_proj": "to_v", "to_add_out": "to_out.0"}
#: role of a narrowed Linear whose LoRA update has no map (refused, with the exact route as the alternative): a
#: single-stream proj_out whose maps came from a format-1 file
UNMAPPED = "unmapped"
#: role of a single-stream block's proj_out, which reads the attention heads and the MLP together
SINGLE_OUT = "single_out"


def _attention_linear(path: str) -> tuple[str, str]:
    """``(attention path, linear name)`` of an attention Linear path (``...attn.to_out.0`` -> ``to_out.0``)."""
    for name in ("to_out.0",):
        if path.endswith(f".{name}"):
            return path[: -len(name) - 1], name
    attention, _, name = path.rpartition(".")
    return attention, name


def lora_map_key(path: str, maps: BasisMaps | None = None) -> str:
    """The key of ``path``'s map in :class:`BasisMaps`: its own, or the first stream's layer for a joint
    attention's second-stream projection that has no map of its own in ``maps`` (the value and query sides
    always share the first stream's; ``to_add_out`` has its own when it was refit apart, format 3)."""
    attention, name = _attention_linear(path)
    if name not in _FIRST_STREAM or (maps is not None and (path in maps.input or path in maps.output)):
        return path
    return f"{attention}.{_FIRST_STREAM[name]}"


def narrowed_linear_roles(model: nn.Module, spec: SlimSpec, maps: BasisMaps | None = None) -> dict[str, str]:
    """``{linear path: role}`` of every Linear the spec narrows (roles: q k v out up down, :data:`SINGLE_OUT`,
    or :data:`UNMAPPED`), paths relative to ``model``.

    Feed-forward projections are named by the maps when there are some (the model's Linears may already be
    wrapped by PEFT, which site discovery does not see through), else found by site discovery. A Flux
    single-stream block's ``proj_out`` reads the attention's heads and the MLP together (:data:`SINGLE_OUT`);
    maps read from a format-1 file do not cover it (:data:`UNMAPPED`).
    """
    out: dict[str, str] = {}
    for path, attention in spec.attention.items():
        names = ("to_q", "to_k", "to_v") if attention.kind == "single" else \
            tuple(_ATTENTION_LINEARS) if attention.kind == "joint" else ("to_q", "to_k", "to_v", "to_out.0")
        out |= {f"{path}.{name}": _ATTENTION_LINEARS[name] for name in names}
    if maps is not None:
        out |= {path: "up" for path in maps.rows}
        out |= {path: "down" for path, t in maps.input.items() if t.ndim == 2}
    else:
        ff_sites = {s.name: s for s in find_sites(model).feed_forward}
        for path, f in spec.feed_forward.items():
            site = ff_sites.get(path)
            if site is not None and f.width < f.inner_dim:
                out |= {site.up: "up", site.down: "down"}
    for proj_out in single_stream_readers(spec):
        out[proj_out] = UNMAPPED if maps is not None and proj_out in maps.unmapped else SINGLE_OUT
    return out


def original_linear_shape(model: nn.Module, spec: SlimSpec, path: str, role: str) -> tuple[int, int]:
    """(in, out) features of the narrowed Linear ``path`` (role as in :func:`narrowed_linear_roles`) before
    slimming, from the spec's widths (the slim model's own layer is narrowed)."""
    layer = _base_layer(model.get_submodule(path))
    if role in (SINGLE_OUT, UNMAPPED):  # a single-stream proj_out: the narrowed parts regain their widths
        attention, mlp = single_stream_readers(spec)[path]
        a = spec.attention[attention] if attention is not None else None
        f = spec.feed_forward[mlp] if mlp is not None else None
        return (layer.in_features + (a.heads * (a.head_dim - a.vo_width) if a else 0)
                + (f.inner_dim - f.width if f else 0), layer.out_features)
    if role in ("q", "k", "v", "out"):
        a = spec.attention[_attention_linear(path)[0]]
        full = a.heads * a.head_dim
        return (layer.in_features, full) if role != "out" else (full, layer.out_features)
    f = next(f for name, f in spec.feed_forward.items() if path.startswith(f"{name}."))  # the FFN holding path
    if role == "up":
        return layer.in_features, (2 if f.gated else 1) * f.inner_dim
    return f.inner_dim, layer.out_features
