"""The Calibrator: forward hooks that collect the statistics slimming needs, and :func:`calibrate`.

Hooks accumulate, per timestep bucket (method.md §2):

* the uncentered second moment (and mean) of the input of every ``to_q``/``to_k``/``to_v`` and of every
  feed-forward down projection. Inputs that are the *same tensor* (q/k/v of a self-attention; k/v of a
  cross-attention; the text states that every cross-attention of a UNet reads) share one accumulator.
  Sharing is detected from tensor identity during the first forward pass and verified afterwards;
* the per-head diagonal blocks of the second moment of the attention output (input of ``to_out[0]``);
* output energies of each attention and feed-forward and the residual-stream energy at each block input
  (Spectral Influence Score, §4.1), and the block-influence cosine ``E cos(h_in, h_out)``.

:func:`calibrate` additionally measures each block's propagation factor by perturbation probing
(:mod:`.propagation`). Under ``torch.distributed`` (``torchrun``, ``accelerate launch``) every rank calibrates
its own share of the prompts and :meth:`Calibrator.finalize` sums the statistics over ranks.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from . import distributed
from .calibration import Calibration, StatKeys, model_fingerprint
from .errors import (
    CalibrationError,
    CalibrationMismatchError,
    ConfigError,
    NonFiniteActivationError,
    UnsupportedArchitectureError,
)
from .heap import release_free_heap
from .moments import EnergyAccumulator, HeadBlockAccumulator, MomentAccumulator, gram_block
from .propagation import ProgressCallback, first_tensor, measure_propagation
from .processor_probe import check_attention_processors
from .sites import AttentionSite, Sites, check_supported, find_sites

logger = logging.getLogger("slimdiff")


@dataclass
class CalibrationConfig:
    """How statistics are collected.

    Attributes:
        num_timestep_buckets: timesteps are split into this many equal chunks of the training schedule and
            statistics are kept per chunk (allows timestep-weighting ablations; memory grows linearly).
        num_train_timesteps: length of the training schedule, to map a timestep to its bucket.
        accumulate_dtype: dtype of the accumulators (fp64 per method.md; fp32 halves memory for SDXL).
        attention_output_statistics: also collect per-head attention-output moments (the input of each VO
            reader: ``to_out.0``, ``to_add_out``, a single-stream ``proj_out``'s attention columns), which
            ``SlimConfig.vo_output_refit`` and ``SlimConfig(vo_statistics="attention_output")`` read. ``"auto"``
            (the default) collects them for the attention kinds whose default slimming reads them (joint and
            single-stream attention, whose VO readers are refit, decisions.md row 26) and not for plain (UNet,
            PixArt) attention, where they would cost about 3% of the sampling time for nothing (row 22).
            ``True``/``False``: for every attention / none; ``pipe.slim()`` turns them on when its config reads
            them for a kind ``"auto"`` leaves out.
        propagation_probe_calls: number of recorded forward calls replayed to measure each block's
            propagation factor (0 disables probing; allocation then falls back to block influence).
        propagation_noise: relative norm of the probe perturbation (η in method.md §4.1).
        group_influence: also measure each group's influence α_g by slimming it alone at a reference rank and
            replaying the same recorded calls (method.md §4.1.1; ``SlimConfig.propagation="measured"``, the
            default allocation where it is measured). Costs one replay of the probe's calls per group (for
            SD1.5, 80 groups against 16 blocks) and the reference plan's decompositions. Needs
            ``propagation_probe_calls > 0``.
        max_memory_bytes: refuse to allocate accumulators beyond this many bytes (None: no limit).
        memory_limit: bytes the statistics may hold in memory at once (None: no limit). When the estimate
            (:func:`estimate_statistics_bytes`, logged before the first forward pass) is larger, :func:`calibrate`
            splits the sites into groups of whole blocks (or of a block's groups, when one block alone is
            larger) and runs ``run_fn`` once per group, over the same
            prompts and seeds (so the result equals a single pass), spilling each group's statistics to a
            safetensors shard in ``spill_dir``; the returned calibration reads them back one tensor at a time.
        spill_dir: folder for those shards (default: a temporary folder removed with the calibration).
        check_finite: raise :class:`NonFiniteActivationError` on NaN/inf activations.
        statistics_device: where the second-moment accumulators (the bulk of the statistics) live, e.g.
            ``"cpu"`` when the model runs on a GPU that has no room for them (diffusers offloading). The products
            are still computed on the activations' device and added into the accumulators there. Default (None):
            the activations' device. Energies and counts (a few numbers per site) always follow the activations.
    """

    num_timestep_buckets: int = 1
    num_train_timesteps: int = 1000
    accumulate_dtype: torch.dtype = torch.float64
    attention_output_statistics: bool | Literal["auto"] = "auto"
    propagation_probe_calls: int = 4
    propagation_noise: float = 1e-2
    group_influence: bool = True
    max_memory_bytes: int | None = None
    memory_limit: int | None = None
    spill_dir: str | None = None
    check_finite: bool = True
    statistics_device: str | torch.device | None = None

    def __post_init__(self) -> None:
        if self.statistics_device is not None:
            try:
                self.statistics_device = torch.device(self.statistics_device)
            except (RuntimeError, TypeError, ValueError) as exc:
                raise ConfigError(f"statistics_device={self.statistics_device!r} is not a device (e.g. 'cpu', "
                                  f"'cuda', 'cuda:1'): {exc}") from None
            kind = self.statistics_device.type
            if kind != "cpu" and not (hasattr(torch, kind) and getattr(torch, kind).is_available()):
                raise ConfigError(f"statistics_device={str(self.statistics_device)!r}: no {kind} device is "
                                  "available here")
        if self.attention_output_statistics not in (True, False, "auto"):
            raise ConfigError(f"attention_output_statistics must be True, False or 'auto', got "
                              f"{self.attention_output_statistics!r}")
        if not isinstance(self.num_timestep_buckets, int) or self.num_timestep_buckets < 1:
            raise ValueError("num_timestep_buckets must be an integer >= 1")
        if not isinstance(self.num_train_timesteps, int) or self.num_train_timesteps < 1:
            raise ValueError("num_train_timesteps must be an integer >= 1")
        if self.accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError("accumulate_dtype must be torch.float32 or torch.float64")
        if not isinstance(self.propagation_probe_calls, int) or self.propagation_probe_calls < 0:
            raise ValueError("propagation_probe_calls must be an integer >= 0")
        if not 0.0 < float(self.propagation_noise) < 1.0:
            raise ValueError("propagation_noise must be in (0, 1)")
        if not isinstance(self.group_influence, bool):
            raise ConfigError(f"group_influence must be True or False, got {self.group_influence!r}")
        if self.max_memory_bytes is not None and self.max_memory_bytes <= 0:
            raise ValueError("max_memory_bytes must be positive (or None for no limit)")
        if self.memory_limit is not None and (not isinstance(self.memory_limit, int) or self.memory_limit <= 0):
            raise ValueError("memory_limit must be a positive number of bytes (or None for no limit)")

    def to_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, (torch.dtype, torch.device)) else v) for k, v in asdict(self).items()}

    def collects_attention_outputs(self, attention_kind: str) -> bool:
        """Whether attention sites of ``attention_kind`` get their attention-output moments; the one place that
        resolves ``attention_output_statistics="auto"`` (to the kinds the default :class:`SlimConfig` reads)."""
        if self.attention_output_statistics == "auto":
            return attention_kind in _default_output_kinds()
        return bool(self.attention_output_statistics)


@functools.cache
def _default_output_kinds() -> frozenset[str]:
    """The attention kinds whose head outputs the default :class:`SlimConfig` reads (fixed for a version)."""
    from .config import SlimConfig
    return SlimConfig().attention_kinds_reading_outputs()


def estimate_statistics_bytes(sites: Sites, config: CalibrationConfig) -> int:
    """Bytes the accumulators will need, before any forward pass (logged by :class:`Calibrator`).

    Assumes what the hooks find on diffusers and ComfyUI models: q/k/v of a self-attention share one input,
    k/v of a cross-attention share one, and cross-attentions of the same key width read the same text states.
    """
    width = torch.finfo(config.accumulate_dtype).bits // 8
    dims: list[int] = []
    text_widths: set[int] = set()
    for site in sites.attention:
        dims.append(site.query_dim)
        if site.is_joint:
            dims.append(site.context_dim)  # each joint block normalises its own text stream
        if site.is_cross and site.kv_dim not in text_widths:
            text_widths.add(site.kv_dim)
            dims.append(site.kv_dim)
    dims += [site.inner_dim for site in sites.feed_forward]
    moments = sum(d * d + d for d in dims) * width
    heads = sum(len(s.output_paths) * s.heads * (s.head_dim ** 2 + s.head_dim) for s in sites.attention
                if config.collects_attention_outputs(s.kind)) * width
    return config.num_timestep_buckets * (moments + heads)


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _sites_of_blocks(sites: Sites, blocks: list[str]) -> Sites:
    keep = set(blocks)
    return Sites(attention=[s for s in sites.attention if s.block in keep],
                 feed_forward=[s for s in sites.feed_forward if s.block in keep])


def _pass_units(sites: Sites, config: CalibrationConfig) -> list[Sites]:
    """The indivisible parts of a pass, in model order: whole blocks, or a block's groups one by one when the
    block alone exceeds the limit (a Flux.1-dev double block holds two 12288² feed-forward moments)."""
    limit = config.memory_limit
    units: list[Sites] = []
    for block in sites.blocks:
        whole = _sites_of_blocks(sites, [block])
        if estimate_statistics_bytes(whole, config) <= limit:
            units.append(whole)
            continue
        # Splitting a block repeats its block-level energies in each of its passes: the same forward passes give
        # the same numbers, so the copies agree and either is kept.
        for part in [Sites(attention=[s]) for s in whole.attention] + [Sites(feed_forward=[s]) for s in whole.feed_forward]:
            alone = estimate_statistics_bytes(part, config)
            if alone > limit:
                name = (part.attention or part.feed_forward)[0].name
                raise CalibrationError(
                    f"memory_limit={format_bytes(limit)} is below the statistics of one group ({name}: "
                    f"{format_bytes(alone)}); raise the limit or use accumulate_dtype=torch.float32")
            units.append(part)
    return units


def _merge_sites(parts: list[Sites]) -> Sites:
    return Sites(attention=[s for p in parts for s in p.attention], feed_forward=[s for p in parts for s in p.feed_forward])


def plan_passes(sites: Sites, config: CalibrationConfig) -> list[Sites]:
    """Split ``sites`` into passes whose statistics each fit ``config.memory_limit``: consecutive whole blocks,
    or single groups of a block that does not fit alone."""
    limit = config.memory_limit
    if limit is None or estimate_statistics_bytes(sites, config) <= limit:
        return [sites]
    passes: list[list[Sites]] = [[]]
    for unit in _pass_units(sites, config):
        if passes[-1] and estimate_statistics_bytes(_merge_sites([*passes[-1], unit]), config) > limit:
            passes.append([])
        passes[-1].append(unit)
    return [_merge_sites(units) for units in passes]


def timestep_argument(args: tuple, kwargs: dict) -> Any:
    """The timestep argument of a denoiser call as given (a tensor is not read: no device wait): the ``timestep``,
    ``timesteps`` or ``t`` keyword, else the second positional argument. The one rule for where a call's timestep
    is (the calibrator's buckets, and the pipeline adapter's reading of a pipeline's timestep convention)."""
    for key in ("timestep", "timesteps", "t"):
        if key in kwargs:
            return kwargs[key]
    return args[1] if len(args) >= 2 else None


def _timestep_value(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.float().mean()) if value.numel() else None
    return float(value) if isinstance(value, (int, float)) else None


def _timestep_of(args: tuple, kwargs: dict) -> float | None:
    return _timestep_value(timestep_argument(args, kwargs))


def _clone_tree(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_clone_tree(o) for o in obj)
    if isinstance(obj, list):
        return [_clone_tree(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    return obj


def context_stream(block: str) -> str:
    """The name the second (text) stream's input energy of a joint block is recorded under."""
    return f"{block}:context"


def block_inputs(args: tuple, kwargs: dict) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(hidden_states, encoder_hidden_states) of a block call, positional or keyword (diffusers' transformer
    blocks are called with keywords; UNet blocks and ComfyUI's with positional hidden states)."""
    h_in = args[0] if args and isinstance(args[0], torch.Tensor) else \
        next((kwargs[k] for k in ("hidden_states", "x") if isinstance(kwargs.get(k), torch.Tensor)), None)
    context = kwargs.get("encoder_hidden_states")
    if context is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
        context = args[1]
    return h_in, context if isinstance(context, torch.Tensor) else None


def stream_output(out: Any, h_in: torch.Tensor | None) -> torch.Tensor | None:
    """The block output that continues the residual stream ``h_in``.

    A block may return one tensor or a tuple of streams (diffusers' Flux and SD3 blocks return
    ``(encoder_hidden_states, hidden_states)``, SD3's last block ``(None, hidden_states)``). Among the outputs of
    ``h_in``'s shape, the one closest to ``h_in`` (cosine) is its continuation: a residual block changes its
    stream by a small update, the other stream is another residual altogether.
    """
    if not isinstance(h_in, torch.Tensor):
        return None
    if isinstance(out, torch.Tensor):
        return out if out.shape == h_in.shape else None
    candidates = [o for o in (out if isinstance(out, (tuple, list)) else [first_tensor(out)])
                  if isinstance(o, torch.Tensor) and o.shape == h_in.shape]
    if len(candidates) <= 1:
        return candidates[0] if candidates else None
    ref = h_in.detach().float().flatten()
    return max(candidates, key=lambda o: float(torch.nn.functional.cosine_similarity(o.detach().float().flatten(),
                                                                                      ref, dim=0)))


def _some(paths: list[str], shown: int = 3) -> str:
    """The first ``shown`` module paths and how many more (one line for the 57 blocks of FLUX.1-dev)."""
    return ", ".join(paths[:shown]) + (f" and {len(paths) - shown} more" if len(paths) > shown else "")


def _channel_dim(x: torch.Tensor, width: int) -> int:
    if x.shape[-1] == width:
        return -1
    if x.dim() >= 3 and x.shape[1] == width:
        return 1
    raise CalibrationError(f"cannot find a channel dimension of width {width} in a tensor of shape {tuple(x.shape)}")


def _token_cosines(a: torch.Tensor, b: torch.Tensor, dim: int, eps: float = 1e-8) -> torch.Tensor:
    """Cosine of each token's ``a`` and ``b`` vectors along ``dim``, as ``F.cosine_similarity`` (zero for a zero
    vector). Written out because torch's kernel took 2–9× as long at the default model's block shapes
    (channel-first UNet activations: a strided reduction), measured 2026-12-01 on one CPU thread."""
    norms = (a * a).sum(dim).sqrt() * (b * b).sum(dim).sqrt()
    return (a * b).sum(dim) / norms.clamp_min(eps)


class Calibrator:
    """Collects calibration statistics from forward passes that run anywhere.

    Use :meth:`attach` around the forward passes (it can be entered several times, e.g. once per sampler
    call), then :meth:`finalize`. :func:`calibrate` is the one-call version.
    """

    def __init__(self, model: nn.Module, config: CalibrationConfig | None = None, sites: Sites | None = None,
                 record_calls: int = 0):
        self.config = config or CalibrationConfig()
        self.sites = sites if sites is not None else find_sites(model)
        check_supported(self.sites, type(model).__name__)
        check_attention_processors(model, self.sites, type(model).__name__)  # probes custom plain processors
        skipped = self.sites.skipped_by_reason()
        if not len(self.sites):
            reasons = "; ".join(f"{_some(paths)}: {reason}" for reason, paths in skipped.items()) or \
                "no attention or feed-forward modules found"
            raise UnsupportedArchitectureError(f"{type(model).__name__} has nothing SlimDiff can slim ({reasons}). "
                                               "Nothing was run or changed.")
        for reason, paths in skipped.items():
            logger.warning("not slimmed: %s (%s)", _some(paths), reason)
            if len(paths) > 3:
                logger.info("not slimmed, all %d: %s", len(paths), ", ".join(paths))
        estimate = estimate_statistics_bytes(self.sites, self.config)
        logger.info("calibration statistics of %d groups: about %s (%s)", len(self.sites), format_bytes(estimate),
                    str(self.config.accumulate_dtype).replace("torch.", ""))
        limit = self.config.max_memory_bytes
        if limit is not None and estimate > limit:
            raise CalibrationError(
                f"calibration statistics need about {estimate / 2**30:.2f} GiB, more than "
                f"max_memory_bytes={limit / 2**30:.2f} GiB. Use fewer timestep buckets, "
                "accumulate_dtype=torch.float32, or raise the limit.")
        self.fingerprint = model_fingerprint(model, self.sites)
        self.record_calls = record_calls
        self.recorded_calls: list[tuple[tuple, dict]] = []
        self.num_forward_calls = 0
        # Calibration in passes checks that every pass saw the same model inputs (a checksum per call).
        self.track_inputs = False
        self.input_checksums: list[float] = []
        self._inputs: dict[str, MomentAccumulator] = {}
        self._heads: dict[str, HeadBlockAccumulator] = {}
        self._energy: dict[str, EnergyAccumulator] = {}
        self._block_in: dict[str, EnergyAccumulator] = {}
        self._cos: dict[str, EnergyAccumulator] = {}
        self._alias: dict[str, str] = {}
        self._tokens: dict[str, list[float]] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._checked_calls = 0  # forward calls whose inputs the finite check has read
        self._bucket = 0
        self._forward_index = -1
        self._aliases_frozen = False
        self._max_timestep = float("-inf")
        self._previous_timestep: Any = None  # the last call's timestep argument, unread (see _end_folds_...)
        self._started = time.perf_counter()

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def memory_bytes(self) -> int:
        accs = [*self._inputs.values(), *self._heads.values()]
        return sum(a.nbytes for a in accs)

    def _check_memory(self, extra: int) -> None:
        limit = self.config.max_memory_bytes
        if limit is not None and self.memory_bytes + extra > limit:
            raise CalibrationError(
                f"calibration statistics need more than max_memory_bytes={limit / 2**30:.2f} GiB "
                f"(already {self.memory_bytes / 2**30:.2f} GiB). Use fewer timestep buckets, "
                "accumulate_dtype=torch.float32, or raise the limit."
            )

    def _new_moment(self, dim: int, device: torch.device) -> MomentAccumulator:
        nb = self.config.num_timestep_buckets
        self._check_memory(nb * (dim * dim + dim) * torch.finfo(self.config.accumulate_dtype).bits // 8)
        return MomentAccumulator(dim, nb, self.config.accumulate_dtype, self.config.statistics_device or device,
                                 block=gram_block(device))

    def _raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteActivationError` if a layer input seen since the last check was NaN/inf.

        Read once per forward call (at the next call, and when the hooks come off) from the running column sums
        the moment accumulators keep anyway: a NaN or ±inf anywhere in a column makes that column's sum
        non-finite for good (NaN propagates, inf + finite is inf, inf − inf is NaN), so the sums stand for every
        element of every call so far. One concatenation and one reduction per device and call replace a check
        per layer and call (two tensor operations each: ~1% of the hooked time on the default model, row 22),
        and on an accelerator the host still waits for the device once per call, not once per layer. The layer
        named is the first one, in forward order, whose sums went bad: where the NaN/inf entered.
        """
        if not self.config.check_finite or not self._inputs or self._checked_calls == self.num_forward_calls:
            return
        self._checked_calls = self.num_forward_calls
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for acc in self._inputs.values():
            by_device.setdefault(acc.x.device, []).append(acc.x.reshape(-1))
        if all(bool(torch.isfinite(torch.cat(sums)).all()) for sums in by_device.values()):
            return
        where = next(key for key, acc in self._inputs.items() if not bool(torch.isfinite(acc.x).all()))
        raise NonFiniteActivationError(self._nonfinite_message(where, self.num_forward_calls))

    @staticmethod
    def _nonfinite_message(where: str, call: int) -> str:
        return (f"NaN/inf activation at the input of {where} (forward call {call}), or values so large that "
                "their fp32 sums overflow. "
                "The model produces non-finite values on the calibration inputs: check its dtype (fp16 "
                "overflow: calibrate in fp32 or bf16), the prompts and the sampler settings.")

    # -- hooks -------------------------------------------------------------------------------------

    def _on_root_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._raise_if_nonfinite()  # the previous call's inputs: one wait per call on an accelerator
        self._seen.clear()
        self._forward_index += 1
        if self._forward_index == 1:
            self._aliases_frozen = True
        self.num_forward_calls += 1
        if self.track_inputs:
            x = first_tensor(args) if args else first_tensor(kwargs)
            self.input_checksums.append(float(x.double().sum()) if x is not None else 0.0)
        raw_timestep = timestep_argument(args, kwargs)
        self._end_folds_at_new_trajectory(raw_timestep)
        nb = self.config.num_timestep_buckets
        if nb > 1:  # reading a device timestep waits for the device: only when buckets need it
            t = _timestep_value(raw_timestep)
            if t is None:
                raise CalibrationError("num_timestep_buckets > 1 needs the timestep of each forward call, "
                                       "but the model was called without a `timestep` argument")
            self._max_timestep = max(self._max_timestep, t)
            frac = min(max(t / self.config.num_train_timesteps, 0.0), 1.0 - 1e-9)
            self._bucket = int(frac * nb)
        if len(self.recorded_calls) < self.record_calls:
            self.recorded_calls.append((_clone_tree(args), _clone_tree(kwargs)))

    def _end_folds_at_new_trajectory(self, raw_timestep: Any) -> None:
        """Multiply out the fold buffers when this call starts a new sampling trajectory.

        A trajectory's timesteps never rise (repeats: true CFG's two calls, Heun's second evaluation), so a call
        whose timestep is above the previous call's starts a new one (the next prompt batch). Ending every fold
        there makes the grouping of the fp32 products a property of each trajectory alone: a calibration split
        between prompt batches (torch.distributed ranks, ``Calibration.merge`` of separate runs) then sums the
        very same products as the single run, equal to fp64 rounding (issue 9 asks 1e-9; folds spanning the
        split differed by ~1e-7). The timesteps are read only while some rows are waiting (no device wait
        otherwise); a call without a readable timestep ends no fold.
        """
        previous = self._previous_timestep
        # a clone, in case the caller reuses one timestep tensor in place (no device wait: an async copy)
        self._previous_timestep = raw_timestep.detach().clone() if isinstance(raw_timestep, torch.Tensor) \
            else raw_timestep
        if previous is None or raw_timestep is None or not any(a.pending_rows for a in self._inputs.values()):
            return
        t, t_before = _timestep_value(raw_timestep), _timestep_value(previous)
        if t is not None and t_before is not None and t > t_before:
            for acc in self._inputs.values():
                acc.flush()

    def _on_linear_input(self, path: str, x: torch.Tensor) -> None:
        key_seen = self._seen.get(id(x))
        shared_with = key_seen[1] if key_seen is not None and key_seen[0]() is x else None
        if path not in self._alias:
            if self._aliases_frozen and shared_with is None:
                # A layer that did not run in the first forward pass: give it its own accumulator.
                self._alias[path] = path
            else:
                self._alias[path] = shared_with or path
        key = self._alias[path]
        if key != path:
            if shared_with != key:
                raise CalibrationError(
                    f"the input of {path} was the same tensor as the input of {key} in the first forward pass "
                    "but not in this one; calibrate with a model whose layers always see the same inputs"
                )
            return  # already accumulated through `key`
        acc = self._inputs.get(key)
        if acc is None:
            acc = self._inputs[key] = self._new_moment(x.shape[-1], x.device)
        acc.add(x, self._bucket)
        rows = x.shape[0] if x.dim() >= 3 else 1
        tokens = x.numel() / x.shape[-1] / rows
        self._tokens.setdefault(path, [0.0, 0.0])
        self._tokens[path][0] += tokens
        self._tokens[path][1] += 1
        self._seen[id(x)] = (weakref.ref(x), key)

    def _hooks(self, live: nn.Module) -> list[torch.utils.hooks.RemovableHandle]:
        modules = dict(live.named_modules())
        missing = [p for p in self.sites.linear_paths() if p not in modules]
        if missing:
            raise CalibrationMismatchError(f"the module being calibrated lacks {missing[:3]} (…): it is not the model "
                                           "the sites were found in")
        handles = [live.register_forward_pre_hook(self._on_root_call, with_kwargs=True)]
        nb = self.config.num_timestep_buckets

        def linear_pre_hook(path: str) -> Callable:
            def hook(_m: nn.Module, args: tuple) -> None:
                self._on_linear_input(path, args[0])
            return hook

        def energy_hook(path: str, width: int) -> Callable:
            acc = self._energy.setdefault(path, EnergyAccumulator(nb, "cpu"))

            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                y = first_tensor(out)
                if y is not None:
                    acc.add(y.detach(), width, self._bucket)
            return hook

        def add_heads(site: AttentionSite, out_path: str, u: torch.Tensor) -> None:
            acc = self._heads.get(out_path)
            if acc is None:
                self._check_memory(nb * site.heads * site.head_dim ** 2 * 8)
                acc = self._heads[out_path] = HeadBlockAccumulator(
                    site.heads, site.head_dim, nb, self.config.accumulate_dtype,
                    self.config.statistics_device or u.device)
            acc.add(u.detach(), self._bucket)

        def head_hook(site: AttentionSite, out_path: str) -> Callable:
            def hook(_m: nn.Module, args: tuple) -> None:
                add_heads(site, out_path, args[0])
            return hook

        def output_hook(path: str) -> Callable:
            """Statistics of a module's *output* (a single-stream block's MLP activation, act_mlp)."""
            def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
                self._on_linear_input(path, out)
            return hook

        def add_energy(path: str, y: torch.Tensor, width: int) -> None:
            acc = self._energy.setdefault(path, EnergyAccumulator(nb, "cpu"))
            acc.add(y.detach(), width, self._bucket)

        def single_stream_hook(attn_site: AttentionSite | None, mlp_site: Any) -> Callable:
            """proj_out of a single-stream block reads concat[u, a]: the attention output u (first H·dh columns)
            and the MLP activation a. Records u's per-head moments and the energy of each branch's contribution
            u·W_uᵀ and a·W_aᵀ (the groups' outputs; the shared bias belongs to neither)."""
            # resolved once here, not per forward call
            collect_heads = attn_site is not None and self.config.collects_attention_outputs(attn_site.kind)

            def hook(module: nn.Module, args: tuple) -> None:
                x = args[0]
                width = module.in_features - (mlp_site.inner_dim if mlp_site else 0) if attn_site is None \
                    else attn_site.heads * attn_site.head_dim
                u, a = x[..., :width], x[..., width:]
                weight = module.weight.detach()
                if attn_site is not None:
                    if collect_heads:
                        add_heads(attn_site, attn_site.out, u)
                    add_energy(attn_site.out, u @ weight[:, :width].T.to(u.dtype), module.out_features)
                if mlp_site is not None:
                    add_energy(mlp_site.name, a @ weight[:, width:].T.to(a.dtype), module.out_features)
            return hook

        def block_hook(path: str, width: int) -> Callable:
            e_acc = self._block_in.setdefault(path, EnergyAccumulator(nb, "cpu"))
            c_acc = self._cos.setdefault(path, EnergyAccumulator(nb, "cpu"))
            context_acc = self._block_in.setdefault(context_stream(path), EnergyAccumulator(nb, "cpu")) \
                if path in context_blocks else None

            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                h_in, context_in = block_inputs(args, kwargs)
                h_out = stream_output(out, h_in)
                if h_out is None:
                    return
                dim = _channel_dim(h_in, width)
                e_acc.add(h_in.detach(), width, self._bucket)
                cos = _token_cosines(h_in.float(), h_out.float(), dim)
                c_acc.add_total(cos.sum(), cos.numel(), self._bucket)
                if context_acc is not None and isinstance(context_in, torch.Tensor):
                    context_acc.add(context_in.detach(), context_in.shape[-1], self._bucket)
            return hook

        # Blocks whose groups write to a second stream (joint attention's to_add_out, ff_context) also record
        # that stream's input energy, which normalises those groups' influence (plan._influence).
        context_blocks = {s.block for s in self.sites.attention if s.add_out} | \
            {s.block for s in self.sites.feed_forward if s.stream == "context"}

        for site in self.sites.attention:
            for path in site.input_paths:
                handles.append(modules[path].register_forward_pre_hook(linear_pre_hook(path)))
            if site.kind == "single":
                continue  # proj_out reads concat[attention, MLP]: one hook below serves both groups
            for out_path in site.output_paths:
                handles.append(modules[out_path].register_forward_hook(energy_hook(out_path, modules[out_path].out_features)))
                if self.config.collects_attention_outputs(site.kind):
                    handles.append(modules[out_path].register_forward_pre_hook(head_hook(site, out_path)))
        for site in self.sites.feed_forward:
            if site.kind == "single":
                handles.append(modules[site.hidden].register_forward_hook(output_hook(site.hidden)))
                continue
            handles.append(modules[site.down].register_forward_pre_hook(linear_pre_hook(site.down)))
            handles.append(modules[site.name].register_forward_hook(energy_hook(site.name, site.dim)))
        single_attention = {s.block: s for s in self.sites.attention if s.kind == "single"}
        single_mlp = {s.block: s for s in self.sites.feed_forward if s.kind == "single"}
        for block in dict.fromkeys([*single_attention, *single_mlp]):
            attn_site, mlp_site = single_attention.get(block), single_mlp.get(block)
            proj_out = attn_site.out if attn_site else mlp_site.down
            handles.append(modules[proj_out].register_forward_pre_hook(single_stream_hook(attn_site, mlp_site)))
        widths = {s.block: s.out_dim for s in self.sites.attention} | {s.block: s.dim for s in self.sites.feed_forward}
        for block in self.sites.blocks:
            handles.append(modules[block].register_forward_hook(block_hook(block, widths[block]), with_kwargs=True))
        return handles

    @contextlib.contextmanager
    def attach(self, live_module: nn.Module) -> Iterator[Calibrator]:
        """Hook ``live_module`` (the model itself, or the live copy that actually runs) for the duration."""
        handles = self._hooks(live_module)
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # XᵀX must not lose precision (method.md §2.2)
        try:
            yield self
            self._raise_if_nonfinite()
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for h in handles:
                h.remove()
            self._seen.clear()

    def finalize(self, propagation: dict[str, float] | None = None, probe_model: nn.Module | None = None,
                 progress: ProgressCallback | None = None, influence_model: nn.Module | None = None) -> Calibration:
        """Freeze the statistics into a :class:`Calibration` (tensors moved to the CPU).

        Under ``torch.distributed`` every rank must call this: statistics are summed over ranks, and rank 0's
        recorded calls are probed (the first calls of the first prompt share, as a single run would probe).

        Args:
            propagation: block propagation factors measured elsewhere.
            probe_model: the live model to measure them on now, by replaying the recorded calls
                (:func:`measure_propagation`); needs ``record_calls > 0``. Call outside :meth:`attach`.
            progress: called as ``progress(done, total)`` after every probe forward call; it may raise to
                cancel (e.g. ComfyUI's interruption check).
            influence_model: the model whose layers the sites name (the calibrated model, or a view whose layers
                share the live model's weights), to measure each group's influence on after the statistics are
                frozen: its groups are slimmed one at a time in place and the recorded calls replayed on
                ``probe_model`` when given, else on it (:func:`~.influence.measure_group_influence`;
                ``CalibrationConfig.group_influence``). Its weights are restored bit for bit. Call outside
                :meth:`attach`.
        """
        from .influence import add_group_influence, group_influence_calls

        probe_seconds = 0.0
        world = distributed.world_size()
        calls = list(self.recorded_calls)
        influence_total = group_influence_calls(self.sites, len(calls)) if influence_model is not None else 0
        probe_progress = None if progress is None else (lambda d, t: progress(d, t + influence_total))
        if world == 1 and self.num_forward_calls == 0:
            raise CalibrationError("no forward pass reached the model during calibration: the run function "
                                   "did not call it (check that it uses this model object)")
        if influence_model is not None and not calls and (world == 1 or distributed.rank() == 0):
            raise CalibrationError("measuring group influence needs recorded calls: create the Calibrator with "
                                   "record_calls > 0 (CalibrationConfig.propagation_probe_calls)")
        if probe_model is not None and propagation is None:
            if not self.recorded_calls and (world == 1 or distributed.rank() == 0):
                raise CalibrationError("propagation probing needs recorded calls: create the Calibrator with "
                                       "record_calls > 0 (CalibrationConfig.propagation_probe_calls)")
            started = time.perf_counter()
            logger.info("propagation probe started: %d blocks, %d recorded calls (%d forward calls)",
                        len(self.sites.blocks), len(self.recorded_calls),
                        (len(self.sites.blocks) + 1) * len(self.recorded_calls))
            if world == 1 or distributed.rank() == 0:
                with torch.no_grad():
                    propagation = measure_propagation(probe_model, self.sites.blocks, self.recorded_calls,
                                                      noise=self.config.propagation_noise, progress=probe_progress)
            if world > 1:
                propagation = distributed.broadcast_object(propagation)
            probe_seconds = time.perf_counter() - started
            logger.info("propagation probing: %d blocks in %.1fs", len(propagation), probe_seconds)
        probe_calls = len(self.recorded_calls)
        self.recorded_calls.clear()
        if self.config.num_timestep_buckets > 1 and self.config.num_train_timesteps > 1 and \
                0.0 <= self._max_timestep <= 1.0:
            logger.warning("every timestep seen was in [0, 1] (flow-matching models such as Flux take t/1000) but "
                           "num_train_timesteps=%d: all calls fall in the first timestep bucket; calibrate with "
                           "CalibrationConfig(num_train_timesteps=1)", self.config.num_train_timesteps)
        tensors = self._statistics()
        forward_calls = self.num_forward_calls
        tokens = {p: list(v) for p, v in self._tokens.items()}
        if world > 1:
            aliases = distributed.all_gather_object(self._alias)
            if any(a != aliases[0] for a in aliases):
                raise CalibrationError("the ranks found different shared inputs: every rank must run the same model "
                                       "with the same kind of inputs")
            distributed.all_reduce_sum(tensors)
            forward_calls = int(distributed.all_reduce_scalars([forward_calls])[0])
            paths = sorted(tokens)
            sums = distributed.all_reduce_scalars([x for p in paths for x in tokens[p]])
            tokens = {p: [sums[2 * i], sums[2 * i + 1]] for i, p in enumerate(paths)}
        if forward_calls == 0:
            raise CalibrationError("no forward pass reached the model during calibration: the run function "
                                   "did not call it (check that it uses this model object)")
        hooked = self.sites.input_paths()
        never_ran = [p for p in hooked if p not in self._alias]
        if never_ran:
            raise CalibrationError(f"{len(never_ran)} layers never ran during calibration (e.g. {never_ran[0]})")
        thin = [key for key, acc in self._inputs.items() if tensors[StatKeys.input(key, "n")].sum() < acc.dim]
        if thin:
            logger.warning("%d statistics saw fewer tokens than their width (e.g. %s): the least-squares refits are "
                           "under-determined; calibrate on more prompts or steps", len(thin), thin[0])
        meta = {
            "num_forward_calls": forward_calls,
            "seconds": round(time.perf_counter() - self._started, 3),  # statistics pass and probing together
            "probe_seconds": round(probe_seconds, 3),
            "probe_calls": probe_calls,
            "memory_bytes": self.memory_bytes,
            "world_size": world,
            "config": self.config.to_dict(),
        }
        logger.info("calibration: %d forward calls, %.1f MiB of statistics", forward_calls, self.memory_bytes / 2**20)
        release_free_heap()  # the forward passes' and the probe's freed activations (SD1.5 configuration: ~450 MiB)
        calibration = Calibration(
            sites=self.sites,
            tensors=tensors,
            linear_inputs=dict(self._alias),
            tokens_per_row={p: s / max(c, 1) for p, (s, c) in tokens.items()},
            fingerprint=self.fingerprint,
            propagation=propagation,
            meta=meta,
        )
        if influence_model is not None:
            probed = (len(self.sites.blocks) + 1) * len(calls) if probe_model is not None else 0
            influence_progress = None if progress is None else \
                (lambda d, t: progress(probed + d, probed + t))
            add_group_influence(influence_model, calibration, calls, influence_progress, runner=probe_model)
        return calibration

    def _statistics(self) -> dict[str, torch.Tensor]:
        """The accumulated sums and counts as named tensors (still on the accumulators' device)."""
        tensors: dict[str, torch.Tensor] = {}
        for key, acc in self._inputs.items():
            tensors |= {StatKeys.input(key, "xx"): acc.freeze(), StatKeys.input(key, "x"): acc.x,
                        StatKeys.input(key, "n"): acc.n}
        for key, acc in self._heads.items():
            tensors |= {StatKeys.heads(key, "xx"): acc.xx, StatKeys.heads(key, "x"): acc.x,
                        StatKeys.heads(key, "n"): acc.n}
        for key, acc in self._energy.items():
            tensors |= {StatKeys.energy(key, "sum"): acc.sum, StatKeys.energy(key, "n"): acc.n}
        for key, acc in self._block_in.items():
            tensors |= {StatKeys.block_input(key, "sum"): acc.sum, StatKeys.block_input(key, "n"): acc.n}
        for key, acc in self._cos.items():
            tensors |= {StatKeys.cos(key, "sum"): acc.sum, StatKeys.cos(key, "n"): acc.n}
        return {k: v.detach().cpu() for k, v in tensors.items()}


def calibrate(model: nn.Module, run_fn: Callable[[], Any], config: CalibrationConfig | None = None,
              sites: Sites | None = None, progress: ProgressCallback | None = None) -> Calibration:
    """Run ``run_fn`` (which drives forward passes through ``model``) and collect slimming statistics.

    Args:
        model: the original (uncompressed) denoiser, e.g. ``pipe.unet``.
        run_fn: a callable with no arguments that runs the model on calibration data, typically the
            pipeline's own sampling loop on the calibration prompts, with CFG on. Under ``torch.distributed``
            each rank's ``run_fn`` runs its own share of the prompts; the statistics are summed over ranks.
            With ``config.memory_limit`` below the statistics' size it is called once per pass and must repeat
            the same forward passes (same prompts and seeds) each time.
        config: what to collect; see :class:`CalibrationConfig`.
        sites: the groups to calibrate (default: :func:`find_sites(model) <find_sites>`).
        progress: ``progress(done, total)`` after each propagation-probe call (may raise to cancel).

    Returns:
        A :class:`Calibration`, reusable for slimming at any budget and savable with ``.save(path)``.
    """
    config = config or CalibrationConfig()
    sites = sites if sites is not None else find_sites(model)
    check_supported(sites, type(model).__name__)
    passes = plan_passes(sites, config) if len(sites) else [sites]
    if len(passes) == 1:
        calibrator = Calibrator(model, config, sites, record_calls=config.propagation_probe_calls)  # checks first
        with torch.no_grad(), calibrator.attach(model):
            run_fn()
        probe = config.propagation_probe_calls > 0
        return calibrator.finalize(probe_model=model if probe else None, progress=progress,
                                   influence_model=model if probe and config.group_influence else None)
    check_attention_processors(model, sites, type(model).__name__)  # before the first pass runs
    return _calibrate_in_passes(model, run_fn, config, sites, passes, progress)


def _calibrate_in_passes(model: nn.Module, run_fn: Callable[[], Any], config: CalibrationConfig, sites: Sites,
                         passes: list[Sites], progress: ProgressCallback | None) -> Calibration:
    """One run of ``run_fn`` per group of blocks; each group's statistics are spilled to a shard, then freed."""
    import tempfile
    from pathlib import Path

    from safetensors.torch import save_file

    from .calibration import ShardedTensors

    started = time.perf_counter()
    holder = None
    if config.spill_dir is None:
        holder = tempfile.TemporaryDirectory(prefix="slimdiff-calibration-")
        folder = Path(holder.name)
    else:
        folder = Path(config.spill_dir)
        folder.mkdir(parents=True, exist_ok=True)
    logger.info("calibration statistics (%s) exceed memory_limit (%s): %d passes over the same prompts",
                format_bytes(estimate_statistics_bytes(sites, config)), format_bytes(config.memory_limit), len(passes))
    locations: dict[str, Path] = {}  # statistic -> the shard holding it
    linear_inputs: dict[str, str] = {}
    tokens: dict[str, float] = {}
    recorded: list[tuple[tuple, dict]] = []
    checksums: list[float] = []
    calls: int | None = None
    memory = 0
    for index, part in enumerate(passes):
        calibrator = Calibrator(model, config, part, record_calls=config.propagation_probe_calls if index == 0 else 0)
        calibrator.track_inputs = True
        with torch.no_grad(), calibrator.attach(model):
            run_fn()
        if index == 0:
            recorded = list(calibrator.recorded_calls)
            checksums = calibrator.input_checksums
        elif calibrator.input_checksums != checksums:
            raise CalibrationError(
                f"the run function's forward calls in pass {index + 1} differ from those of the first pass "
                f"({len(calibrator.input_checksums)} vs {len(checksums)} calls, or other inputs): calibration in passes "
                "(memory_limit) needs a run function that repeats the same forward passes (same prompts, seeds and "
                "noise: create its random generators inside it) every time it is called")
        result = calibrator.finalize()
        calls = result.meta["num_forward_calls"]
        memory = max(memory, result.meta["memory_bytes"])
        # Accumulators shared across passes (the text states every cross-attention reads) get pass-local names.
        prefix = f"pass{index}:"
        renamed = {key: prefix + key for key in result.linear_inputs.values()}
        shard = folder / f"pass-{index:03d}.safetensors"
        shard_tensors = {_rename_stat(k, renamed): v.contiguous() for k, v in result.tensors.items()}
        save_file(shard_tensors, str(shard))
        locations |= dict.fromkeys(shard_tensors, shard)
        del shard_tensors
        linear_inputs |= {path: renamed[key] for path, key in result.linear_inputs.items()}
        tokens |= result.tokens_per_row
        del result, calibrator  # the pass's statistics now live only in its shard
        logger.info("calibration pass %d/%d done (%d groups in %d blocks)", index + 1, len(passes), len(part), len(part.blocks))
    propagation = None
    probe_seconds = 0.0
    if config.propagation_probe_calls > 0 and recorded and (distributed.world_size() == 1 or distributed.rank() == 0):
        probe_started = time.perf_counter()
        with torch.no_grad():
            propagation = measure_propagation(model, sites.blocks, recorded, noise=config.propagation_noise,
                                              progress=progress)
        probe_seconds = time.perf_counter() - probe_started
    if distributed.world_size() > 1 and config.propagation_probe_calls > 0:
        propagation = distributed.broadcast_object(propagation)
    meta = {"num_forward_calls": calls, "seconds": round(time.perf_counter() - started, 3),
            "probe_seconds": round(probe_seconds, 3), "probe_calls": len(recorded), "memory_bytes": memory,
            "passes": len(passes), "world_size": distributed.world_size(), "config": config.to_dict()}
    calibration = Calibration(sites=sites, tensors=ShardedTensors(locations, keep_alive=holder),
                              linear_inputs=linear_inputs, tokens_per_row=tokens,
                              fingerprint=model_fingerprint(model, sites), propagation=propagation, meta=meta)
    if config.group_influence and config.propagation_probe_calls > 0:
        from .influence import add_group_influence

        add_group_influence(model, calibration, recorded, progress)
    return calibration


def _rename_stat(name: str, renamed: dict[str, str]) -> str:
    kind, _, rest = name.partition("/")
    if kind != "input":
        return name
    key, _, part = rest.rpartition("/")
    return f"input/{renamed.get(key, key)}/{part}"
