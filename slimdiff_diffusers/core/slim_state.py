"""Checks of a slim model's tensors against its spec, run before anything is allocated or loaded.

A slim file or folder holds a :class:`SlimSpec` (the widths) and a state dict (the weights). Both are written
together by SlimDiff, so any disagreement means a damaged, edited or mixed-up file; it must be reported with the
file and the tensor it concerns, not as a size-mismatch wall from ``load_state_dict`` or a failure at the first
forward pass. The checks here read only tensor *shapes* (from the safetensors header) and, once tensors are
loaded, their finiteness.

Key names: the spec's module paths are relative to the same root as the state dict. Attention projections are
``{path}.to_q/.to_k/.to_v/.to_out.0`` (diffusers and ldm alike); a feed-forward's up projection is
``{path}.net.0.proj`` (GEGLU/GELU) or ``{path}.net.0.0`` (ComfyUI's plain-GELU ``Sequential``) and its down
projection the last ``{path}.net.{i}`` Linear (see :mod:`.sites`). Transformer kinds (``AttentionSpec.kind`` /
``FeedForwardSpec.kind``): joint attention adds ``{path}.add_q_proj/.add_k_proj/.add_v_proj`` and, when present,
``{path}.to_add_out``; single-stream attention ``{path}`` has no ``to_out``: its output columns are the first ones
of ``{parent}.proj_out``, whose last columns belong to the feed-forward ``{parent}`` (``proj_mlp`` → ``proj_out``).
"""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .errors import SlimWeightsError
from .spec import SlimSpec

_REFIX = ("the file is damaged or was edited: re-download it, or export the slim model again "
          "(save_pretrained / save_slim_unet_file / the Save Slim Model node)")


def safetensors_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors header, without reading any tensor data."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}


def expected_slim_shapes(spec: SlimSpec, shapes: Mapping[str, tuple[int, ...]],
                         source: str) -> dict[str, tuple[int | None, int | None]]:
    """(rows, columns) every narrowed weight must have per ``spec`` (``None``: not fixed by the spec).

    Raises :class:`SlimWeightsError` when a tensor the spec needs is absent from ``shapes``.
    """
    expected: dict[str, tuple[int | None, int | None]] = {}
    missing: list[str] = []
    # A single-stream block's proj_out: columns = attention (heads·vo) + MLP (width); filled by both entries.
    proj_out_columns: dict[str, dict[str, int]] = {}
    for path, a in spec.attention.items():
        rows = {"to_q": a.heads * a.qk_width, "to_k": a.heads * a.qk_width, "to_v": a.heads * a.vo_width}
        if a.kind == "joint":
            rows |= {"add_q_proj": a.heads * a.qk_width, "add_k_proj": a.heads * a.qk_width,
                     "add_v_proj": a.heads * a.vo_width}
        for name, n in rows.items():
            expected[f"{path}.{name}.weight"] = (n, None)
            expected[f"{path}.{name}.bias"] = (n, None)  # only checked if present: biases are optional
        readers = ["to_out.0"] + (["to_add_out"] if a.kind == "joint" and f"{path}.to_add_out.weight" in shapes else [])
        if a.kind == "single":
            parent = path.rsplit(".", 1)[0]
            proj_out_columns.setdefault(parent, {})["attention"] = a.heads * a.vo_width
            readers = []
            missing += [k for k in (f"{parent}.proj_out.weight",) if k not in shapes]
        for name in readers:
            expected[f"{path}.{name}.weight"] = (None, a.heads * a.vo_width)
        missing += [f"{path}.{n}.weight" for n in [*rows, *readers] if f"{path}.{n}.weight" not in shapes]
    for path, f in spec.feed_forward.items():
        if f.kind == "single":
            up = f"{path}.proj_mlp.weight"
            if up not in shapes or f"{path}.proj_out.weight" not in shapes:
                missing += [k for k in (up, f"{path}.proj_out.weight") if k not in shapes]
                continue
            expected[up] = (f.width, None)
            expected[f"{path}.proj_mlp.bias"] = (f.width, None)
            proj_out_columns.setdefault(path, {})["mlp"] = f.width
            continue
        up = next((k for k in (f"{path}.net.0.proj.weight", f"{path}.net.0.0.weight") if k in shapes), None)
        pattern = re.compile(re.escape(path) + r"\.net\.(\d+)\.weight")
        downs = sorted((int(m.group(1)), key) for key in shapes
                       if (m := pattern.fullmatch(key)) and int(m.group(1)) >= 1 and len(shapes[key]) == 2)
        if up is None:
            missing.append(f"{path}.net.0.proj.weight")
            continue
        if not downs:
            missing.append(f"{path}.net.2.weight")
            continue
        up_rows = (2 if f.gated else 1) * f.width
        expected[up] = (up_rows, None)
        expected[up.removesuffix("weight") + "bias"] = (up_rows, None)
        expected[downs[-1][1]] = (None, f.width)
    for block, parts in proj_out_columns.items():
        key = f"{block}.proj_out.weight"
        if key not in shapes or len(shapes[key]) != 2:
            continue
        # The part the spec does not narrow keeps its full width: the proj_mlp rows (MLP) or the to_v rows
        # (attention), both read from the file and themselves checked above when narrowed.
        attention = parts.get("attention", shapes.get(f"{block}.attn.to_v.weight", (None,))[0])
        mlp = parts.get("mlp", shapes.get(f"{block}.proj_mlp.weight", (None,))[0])
        if attention is not None and mlp is not None:
            expected[key] = (None, attention + mlp)
    if missing:
        raise SlimWeightsError(f"{source}: {len(missing)} tensor(s) named by the slim spec are missing, e.g. "
                               f"{missing[:3]}; {_REFIX}")
    return expected


def check_shapes_against_spec(spec: SlimSpec, shapes: Mapping[str, tuple[int, ...]], source: str) -> None:
    """Raise :class:`SlimWeightsError` unless every narrowed tensor in ``shapes`` has the width ``spec`` records."""
    wrong = []
    for key, (rows, cols) in expected_slim_shapes(spec, shapes, source).items():
        shape = shapes.get(key)
        if shape is None:
            continue
        ok = (rows is None or (len(shape) >= 1 and shape[0] == rows)) and \
             (cols is None or (len(shape) == 2 and shape[1] == cols))
        if not ok:
            want = f"{rows} rows" if rows is not None else f"{cols} columns"
            wrong.append(f"{key} has shape {tuple(shape)}, the spec needs {want}")
    if wrong:
        more = f" (and {len(wrong) - 3} more)" if len(wrong) > 3 else ""
        raise SlimWeightsError(f"{source}: tensors do not match the slim spec: {'; '.join(wrong[:3])}{more}; {_REFIX}")


def check_shapes_against_model(expected: Mapping[str, tuple[int, ...]], shapes: Mapping[str, tuple[int, ...]],
                               source: str, model_name: str = "the model") -> None:
    """Raise :class:`SlimWeightsError` listing missing, unexpected and mis-shaped tensors (``expected``: the
    rebuilt model's state-dict shapes, ``shapes``: the file's)."""
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong = [f"{k} is {tuple(shapes[k])}, {model_name} needs {tuple(expected[k])}"
             for k in expected if k in shapes and tuple(shapes[k]) != tuple(expected[k])]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s), e.g. {missing[:3]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}")
    if wrong:
        problems.append(f"{len(wrong)} of another shape, e.g. {'; '.join(wrong[:3])}")
    if problems:
        raise SlimWeightsError(f"{source} does not match {model_name} rebuilt from its recorded configuration: "
                               f"{', '.join(problems)}; {_REFIX}")


def check_finite(tensors: Iterable[tuple[str, torch.Tensor]], source: str) -> None:
    """Raise :class:`SlimWeightsError` naming the tensors that hold NaN or inf (floating tensors only)."""
    bad = [name for name, t in tensors
           if t.is_floating_point() and t.numel() and t.device.type != "meta" and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise SlimWeightsError(f"{source}: {len(bad)} weight tensor(s) contain NaN or inf, e.g. {bad[:3]}{more}. "
                               "The model would produce NaN images. Export it again from a model that runs "
                               "(slim in fp32 or bf16 if fp16 overflowed), or re-download the file")
