"""Propagation probing: how strongly a perturbation of each block's output reaches the model output (π_b).

method.md §4.1: replay recorded forward calls; for each block add isotropic noise of relative norm η to the
block output and measure the relative change of the model output. Blocks that return tuples (transformer
blocks with two streams) are perturbed in their first tensor, the stream the block is named for.
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


@torch.no_grad()
def measure_propagation(model: nn.Module, blocks: list[str], calls: list[tuple[tuple, dict]],
                        noise: float = 1e-2, seed: int = 0,
                        progress: ProgressCallback | None = None) -> dict[str, float]:
    """π_b: relative change of the model output per unit relative perturbation of block b's output.

    Replays the recorded ``calls`` (``(args, kwargs)`` of the model's forward); for each block adds isotropic
    noise of relative norm ``noise`` to the block output (per sample) and measures
    ``mean ‖Δout‖/‖out‖ / noise`` (method.md §4.1). ``progress(done, total)`` is called after every forward call
    (``(len(blocks) + 1) · len(calls)`` in all) and may raise to cancel.
    """
    if not calls:
        raise CalibrationError("propagation probing needs recorded forward calls")
    modules = dict(model.named_modules())
    total = (len(blocks) + 1) * len(calls)
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
    for block in blocks:
        def add_noise(y: torch.Tensor) -> torch.Tensor:
            n = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device)
            dims = tuple(range(1, y.dim()))
            y_norm = y.float().pow(2).sum(dim=dims, keepdim=True).sqrt()
            scale = noise * y_norm / n.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)
            return y + (n * scale).to(y.dtype)

        def perturb(_m: nn.Module, _args: tuple, out: Any, block: str = block) -> Any:
            perturbed, count = _map_streams(out, add_noise)
            if count == 0:
                raise CalibrationError(f"cannot perturb the output of {block} (type {type(out).__name__}): it "
                                       "returns no tensor")
            return perturbed

        handle = modules[block].register_forward_hook(perturb)
        try:
            ratios = []
            for (args, kwargs), ref in zip(calls, clean):
                out = first_tensor(model(*args, **kwargs)).float()
                ratios.append(((out - ref).norm() / ref.norm().clamp_min(1e-12)).item())
                step()
        finally:
            handle.remove()
        result[block] = sum(ratios) / len(ratios) / noise
    return result
