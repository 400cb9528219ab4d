"""Propagation probing: how strongly a perturbation of each block's output reaches the model output (π_b).

method.md §4.1: replay recorded forward calls; for each block add isotropic noise of relative norm η to the
block output and measure the relative change of the model output. A joint block (two residual streams: image and
text tokens) is probed once per stream, the other stream left as it is (decisions.md row 34): the text stream
reaches the output through far weaker paths (flux-tiny: 0.05-0.08 against 0.9-1.2), and the groups writing to it
are weighed by its own factor, stored under ``context_stream(block)`` (``"<block>:context"``).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from .errors import CalibrationError

# progress(done, total): called after every forward call of a long step; it may raise to cancel the step.
ProgressCallback = Callable[[int, int], None]


def first_tensor(obj: Any) -> torch.Tensor | None:
    """The main tensor of a module output or input: itself, the first of a tuple/list, or ``.sample``."""
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj:
        return first_tensor(obj[0])
    if isinstance(obj, dict):
        for key in ("sample", "hidden_states", "x"):
            if key in obj:
                return first_tensor(obj[key])
    sample = getattr(obj, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _map_streams(out: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> tuple[Any, int]:
    """``out`` with ``fn`` applied to every tensor stream (tensor, or tensors in a tuple/list; None kept), and
    how many streams were changed."""
    if isinstance(out, torch.Tensor):
        return fn(out), 1
    if isinstance(out, (tuple, list)):
        items, count = [], 0
        for o in out:
            if isinstance(o, torch.Tensor):
                items.append(fn(o))
                count += 1
            else:
                items.append(o)
        return (tuple(items) if isinstance(out, tuple) else items), count
    return out, 0


def _hidden_index(out: tuple | list, args: tuple, kwargs: dict) -> int:
    """Which tensor of a joint block's output continues its ``hidden_states`` input (see ``stream_output``)."""
    from .streams import block_inputs, stream_output  # streams imports first_tensor from here

    hidden = stream_output(out, block_inputs(args, kwargs)[0])
    index = next((i for i, o in enumerate(out) if o is hidden), None)
    if index is None:
        raise CalibrationError("cannot tell a joint block's image stream from its text stream in its output")
    return index


@torch.no_grad()
def measure_propagation(model: nn.Module, blocks: list[str], calls: list[tuple[tuple, dict]],
                        noise: float = 1e-2, seed: int = 0, progress: ProgressCallback | None = None,
                        context_blocks: list[str] | tuple[str, ...] = ()) -> dict[str, float]:
    """π_b: relative change of the model output per unit relative perturbation of block b's output.

    Replays the recorded ``calls`` (``(args, kwargs)`` of the model's forward); for each block adds isotropic
    noise of relative norm ``noise`` to the block output (per sample) and measures
    ``mean ‖Δout‖/‖out‖ / noise`` (method.md §4.1). For the ``context_blocks`` (joint blocks, whose output is
    ``(text, image)`` or ``(image, text)``), ``π_b`` perturbs the image stream alone and ``π_{b:context}``
    (key ``context_stream(b)``) the text stream alone. ``progress(done, total)`` is called after every forward call
    (``(len(blocks) + len(context_blocks) + 1) · len(calls)`` in all) and may raise to cancel.
    """
    if not calls:
        raise CalibrationError("propagation probing needs recorded forward calls")
    modules = dict(model.named_modules())
    unknown = [b for b in context_blocks if b not in blocks]
    if unknown:
        raise CalibrationError(f"context_blocks must be among the probed blocks, got {unknown}")
    total = (len(blocks) + len(context_blocks) + 1) * len(calls)
    done = 0

    def step() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    clean = []
    for args, kwargs in calls:
        clean.append(first_tensor(model(*args, **kwargs)).float())
        step()
    gen = torch.Generator(device="cpu").manual_seed(seed)
    result: dict[str, float] = {}
    probes = [(block, block, None) for block in blocks]
    from .streams import context_stream

    for block in context_blocks:  # the image stream alone under the block's own name, the text stream beside it
        probes[blocks.index(block)] = (block, block, "hidden")
        probes.append((context_stream(block), block, "context"))
    for key, block, stream in probes:
        def add_noise(y: torch.Tensor) -> torch.Tensor:
            n = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device)
            dims = tuple(range(1, y.dim()))
            y_norm = y.float().pow(2).sum(dim=dims, keepdim=True).sqrt()
            scale = noise * y_norm / n.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)
            return y + (n * scale).to(y.dtype)

        def perturb(_m: nn.Module, args: tuple, kwargs: dict, out: Any, block: str = block,
                    stream: str | None = stream) -> Any:
            if stream is not None:
                if not isinstance(out, (tuple, list)) or sum(isinstance(o, torch.Tensor) for o in out) != 2:
                    raise CalibrationError(f"{block} was expected to return its two streams (a joint block), got "
                                           f"{type(out).__name__}")
                hidden = _hidden_index(out, args, kwargs)
                picked = [i for i, o in enumerate(out) if isinstance(o, torch.Tensor) and
                          (i == hidden) == (stream == "hidden")]
                items = [add_noise(o) if i in picked else o for i, o in enumerate(out)]
                return tuple(items) if isinstance(out, tuple) else items
            perturbed, count = _map_streams(out, add_noise)
            if count == 0:
                raise CalibrationError(f"cannot perturb the output of {block} (type {type(out).__name__}): it "
                                       "returns no tensor")
            return perturbed

        handle = modules[block].register_forward_hook(perturb, with_kwargs=True)
        try:
            ratios = []
            for (args, kwargs), ref in zip(calls, clean):
                out = first_tensor(model(*args, **kwargs)).float()
                ratios.append(((out - ref).norm() / ref.norm().clamp_min(1e-12)).item())
                step()
        finally:
            handle.remove()
        result[key] = sum(ratios) / len(ratios) / noise
    return result
