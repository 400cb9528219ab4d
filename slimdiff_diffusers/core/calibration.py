"""Calibration: run the original model and collect the activation statistics slimming needs.

Hooks accumulate, per timestep bucket (method.md §2):

* the uncentered second moment (and mean) of the input of every ``to_q``/``to_k``/``to_v`` and of every
  feed-forward down projection. Inputs that are the *same tensor* (q/k/v of a self-attention; k/v of a
  cross-attention; the text states that every cross-attention of a UNet reads) share one accumulator.
  Sharing is detected from tensor identity during the first forward pass and verified afterwards;
* the per-head diagonal blocks of the second moment of the attention output (input of ``to_out[0]``);
* output energies of each attention and feed-forward and the residual-stream energy at each block input
  (Spectral Influence Score, §4.1), and the block-influence cosine ``E cos(h_in, h_out)``.

:func:`calibrate` additionally measures each block's propagation factor by perturbation probing.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CalibrationError, CalibrationMismatchError, NonFiniteActivationError, SlimFileError
from .io_utils import atomic_path
from .moments import EnergyAccumulator, HeadBlockAccumulator, MomentAccumulator, combine_buckets
from .sites import AttentionSite, FeedForwardSite, Sites, find_sites

logger = logging.getLogger("slimdiff")

CALIBRATION_FORMAT = "slimdiff.calibration/1"


@dataclass
class CalibrationConfig:
    """How statistics are collected.

    Attributes:
        num_timestep_buckets: timesteps are split into this many equal chunks of the training schedule and
            statistics are kept per chunk (allows timestep-weighting ablations; memory grows linearly).
        num_train_timesteps: length of the training schedule, to map a timestep to its bucket.
        accumulate_dtype: dtype of the accumulators (fp64 per method.md; fp32 halves memory for SDXL).
        attention_output_statistics: also collect per-head attention-output moments ("P-aware" VO).
        propagation_probe_calls: number of recorded forward calls replayed to measure each block's
            propagation factor (0 disables probing; allocation then falls back to block influence).
        propagation_noise: relative norm of the probe perturbation (η in method.md §4.1).
        max_memory_bytes: refuse to allocate accumulators beyond this many bytes (None: no limit).
        check_finite: raise :class:`NonFiniteActivationError` on NaN/inf activations.
    """

    num_timestep_buckets: int = 1
    num_train_timesteps: int = 1000
    accumulate_dtype: torch.dtype = torch.float64
    attention_output_statistics: bool = True
    propagation_probe_calls: int = 4
    propagation_noise: float = 1e-2
    max_memory_bytes: int | None = None
    check_finite: bool = True

    def __post_init__(self) -> None:
        if self.num_timestep_buckets < 1:
            raise ValueError("num_timestep_buckets must be >= 1")
        if self.accumulate_dtype not in (torch.float32, torch.float64):
            raise ValueError("accumulate_dtype must be torch.float32 or torch.float64")


# --------------------------------------------------------------------------------------------------
# Model fingerprint: which model a calibration belongs to
# --------------------------------------------------------------------------------------------------


def model_fingerprint(model: nn.Module, sites: Sites) -> dict[str, Any]:
    """Structure hash of the compressible layers plus a cheap digest of their weights."""
    modules = dict(model.named_modules())
    structure = []
    weight_sq = []
    for path in sites.linear_paths():
        layer = modules[path]
        structure.append([path, layer.in_features, layer.out_features, layer.bias is not None])
        weight_sq.append(float(layer.weight.detach().double().pow(2).sum()))
    digest = hashlib.sha256(json.dumps(structure).encode()).hexdigest()[:16]
    return {"model_class": type(model).__name__, "structure": digest, "weight_sq": weight_sq}


def _compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any], strict_weights: bool) -> str | None:
    if expected["structure"] != actual["structure"]:
        return (f"it was computed on a {expected['model_class']} with a different layer structure than this "
                f"{actual['model_class']} (another architecture, or a model that is already slimmed)")
    if strict_weights:
        a = torch.tensor(expected["weight_sq"], dtype=torch.float64)
        b = torch.tensor(actual["weight_sq"], dtype=torch.float64)
        rel = ((a - b).abs() / a.abs().clamp_min(1e-12)).max().item() if a.numel() else 0.0
        # fp16 storage of the same weights changes these sums by ~1e-4; another checkpoint by far more.
        if rel > 1e-2:
            return ("it was computed on a model with the same architecture but different weights (another "
                    f"checkpoint, or LoRA/merges applied since; max relative weight-norm difference {rel:.3g})")
    return None


# --------------------------------------------------------------------------------------------------
# The Calibration result
# --------------------------------------------------------------------------------------------------


@dataclass
class Calibration:
    """Timestep-bucketed activation statistics of one model, ready for slimming at any budget.

    Tensors live in ``tensors`` under names ``"<kind>/<key>/<field>"`` so the object saves to one
    safetensors file; everything else is JSON metadata.
    """

    sites: Sites
    tensors: dict[str, torch.Tensor]
    linear_inputs: dict[str, str]
    tokens_per_row: dict[str, float]
    fingerprint: dict[str, Any]
    propagation: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    # -- accessors ---------------------------------------------------------------------------------

    @property
    def num_buckets(self) -> int:
        first = next(k for k in self.tensors if k.endswith("/n"))
        return self.tensors[first].numel()

    def _moment(self, kind: str, key: str, weighting: str | list[float]) -> tuple[torch.Tensor, torch.Tensor, float]:
        n = self.tensors[f"{kind}/{key}/n"]
        if n.sum() <= 0:
            raise CalibrationError(f"no activations were recorded for {key}: the calibration run never executed it")
        xx = combine_buckets(self.tensors[f"{kind}/{key}/xx"].double(), n, weighting)
        x = combine_buckets(self.tensors[f"{kind}/{key}/x"].double(), n, weighting)
        return xx, x, float(n.sum())

    def input_moment(self, linear_path: str, weighting: str | list[float] = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
        """(E[xxᵀ], E[x]) of the input of the Linear at ``linear_path``, fp64."""
        try:
            key = self.linear_inputs[linear_path]
        except KeyError:
            raise CalibrationError(f"the calibration has no statistics for {linear_path}") from None
        xx, x, _ = self._moment("input", key, weighting)
        return xx, x

    def attention_output_moment(self, site: AttentionSite, weighting: str | list[float] = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (E[uuᵀ], E[u]) of the attention output u (input of ``to_out[0]``), shapes (H,dh,dh), (H,dh)."""
        if f"heads/{site.out}/n" not in self.tensors:
            raise CalibrationError("the calibration has no attention-output statistics "
                                   "(re-run with attention_output_statistics=True)")
        xx, x, _ = self._moment("heads", site.out, weighting)
        return xx, x

    def energy(self, path: str, weighting: str | list[float] = "tokens") -> float:
        """Mean squared norm per token of the output recorded at ``path`` (or ``block-in`` energy)."""
        n = self.tensors[f"energy/{path}/n"]
        return float(combine_buckets(self.tensors[f"energy/{path}/sum"].double(), n, weighting))

    def block_influence(self, block: str) -> float:
        """MoDeGPT's block influence 1 − E[cos(h_in, h_out)]."""
        n = self.tensors[f"cos/{block}/n"].sum().clamp_min(1.0)
        return float(1.0 - self.tensors[f"cos/{block}/sum"].sum() / n)

    # -- compatibility -----------------------------------------------------------------------------

    def check_compatible(self, model: nn.Module, strict_weights: bool = True) -> None:
        """Raise :class:`CalibrationMismatchError` if this calibration was not computed on ``model``."""
        sites = find_sites(model)
        problem = _compare_fingerprints(self.fingerprint, model_fingerprint(model, sites), strict_weights)
        if problem:
            raise CalibrationMismatchError(
                f"This calibration does not belong to the given model: {problem}. "
                "Calibrate this model (or load the calibration made for it) before slimming."
            )

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the calibration to one ``.safetensors`` file (atomically)."""
        from safetensors.torch import save_file

        header = {
            "format": CALIBRATION_FORMAT,
            "sites": {
                "attention": [asdict(s) for s in self.sites.attention],
                "feed_forward": [asdict(s) for s in self.sites.feed_forward],
                "skipped": self.sites.skipped,
            },
            "linear_inputs": self.linear_inputs,
            "tokens_per_row": self.tokens_per_row,
            "fingerprint": self.fingerprint,
            "propagation": self.propagation,
            "meta": self.meta,
        }
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"slimdiff.calibration": json.dumps(header)})
        logger.info("saved calibration to %s", path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> Calibration:
        """Read a file written by :meth:`save`. Raises :class:`SlimFileError` for anything else."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise SlimFileError(f"{path} is not a readable safetensors file ({exc})") from exc
        if "slimdiff.calibration" not in metadata:
            raise SlimFileError(f"{path} is a safetensors file but not a SlimDiff calibration")
        header = json.loads(metadata["slimdiff.calibration"])
        if header.get("format") != CALIBRATION_FORMAT:
            raise SlimFileError(f"{path} has calibration format {header.get('format')!r}; "
                                f"this version of SlimDiff reads {CALIBRATION_FORMAT!r}")
        s = header["sites"]
        sites = Sites(
            attention=[AttentionSite(**a) for a in s["attention"]],
            feed_forward=[FeedForwardSite(**f) for f in s["feed_forward"]],
            skipped=[tuple(x) for x in s["skipped"]],
        )
        return cls(sites=sites, tensors=tensors, linear_inputs=header["linear_inputs"],
                   tokens_per_row=header["tokens_per_row"], fingerprint=header["fingerprint"],
                   propagation=header["propagation"], meta=header["meta"])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# --------------------------------------------------------------------------------------------------
# The Calibrator: hooks
# --------------------------------------------------------------------------------------------------


def _first_tensor(obj: Any) -> torch.Tensor | None:
    if isinstance(obj, torch.Tensor):
        return obj
    if isinstance(obj, (tuple, list)) and obj:
        return _first_tensor(obj[0])
    if isinstance(obj, dict):
        for key in ("sample", "hidden_states", "x"):
            if key in obj:
                return _first_tensor(obj[key])
    sample = getattr(obj, "sample", None)
    return sample if isinstance(sample, torch.Tensor) else None


def _timestep_of(args: tuple, kwargs: dict) -> float | None:
    for key in ("timestep", "timesteps", "t"):
        if key in kwargs:
            value = kwargs[key]
            break
    else:
        if len(args) < 2:
            return None
        value = args[1]
    if isinstance(value, torch.Tensor):
        return float(value.float().mean()) if value.numel() else None
    return float(value) if isinstance(value, (int, float)) else None


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


def _channel_dim(x: torch.Tensor, width: int) -> int:
    if x.shape[-1] == width:
        return -1
    if x.dim() >= 3 and x.shape[1] == width:
        return 1
    raise CalibrationError(f"cannot find a channel dimension of width {width} in a tensor of shape {tuple(x.shape)}")


class Calibrator:
    """Collects calibration statistics from forward passes that run anywhere.

    Use :meth:`attach` around the forward passes (it can be entered several times, e.g. once per sampler
    call), then :meth:`finalize`. :func:`calibrate` is the one-call version.
    """

    def __init__(self, model: nn.Module, config: CalibrationConfig | None = None, sites: Sites | None = None,
                 record_calls: int = 0):
        self.config = config or CalibrationConfig()
        self.sites = sites if sites is not None else find_sites(model)
        if not len(self.sites):
            reasons = "; ".join(f"{p}: {r}" for p, r in self.sites.skipped) or "no attention or feed-forward modules found"
            raise CalibrationError(f"{type(model).__name__} has nothing SlimDiff can slim ({reasons})")
        for path, reason in self.sites.skipped:
            logger.warning("not slimmed: %s (%s)", path, reason)
        self.fingerprint = model_fingerprint(model, self.sites)
        self.record_calls = record_calls
        self.recorded_calls: list[tuple[tuple, dict]] = []
        self.num_forward_calls = 0
        self._inputs: dict[str, MomentAccumulator] = {}
        self._heads: dict[str, HeadBlockAccumulator] = {}
        self._energy: dict[str, EnergyAccumulator] = {}
        self._cos: dict[str, EnergyAccumulator] = {}
        self._alias: dict[str, str] = {}
        self._tokens: dict[str, list[float]] = {}
        self._seen: dict[int, tuple[weakref.ref, str]] = {}
        self._bucket = 0
        self._forward_index = -1
        self._aliases_frozen = False
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
        return MomentAccumulator(dim, nb, self.config.accumulate_dtype, device)

    def _check(self, x: torch.Tensor, where: str) -> None:
        if self.config.check_finite and not torch.isfinite(x).all():
            raise NonFiniteActivationError(
                f"NaN/inf activation at the input of {where} (forward call {self.num_forward_calls}). "
                "The model produces non-finite values on the calibration inputs: check its dtype (fp16 "
                "overflow: calibrate in fp32 or bf16), the prompts and the sampler settings."
            )

    # -- hooks -------------------------------------------------------------------------------------

    def _on_root_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._seen.clear()
        self._forward_index += 1
        if self._forward_index == 1:
            self._aliases_frozen = True
        self.num_forward_calls += 1
        t = _timestep_of(args, kwargs)
        nb = self.config.num_timestep_buckets
        if nb > 1:
            if t is None:
                raise CalibrationError("num_timestep_buckets > 1 needs the timestep of each forward call, "
                                       "but the model was called without a `timestep` argument")
            frac = min(max(t / self.config.num_train_timesteps, 0.0), 1.0 - 1e-9)
            self._bucket = int(frac * nb)
        if len(self.recorded_calls) < self.record_calls:
            self.recorded_calls.append((_clone_tree(args), _clone_tree(kwargs)))

    def _on_linear_input(self, path: str, x: torch.Tensor) -> None:
        self._check(x, path)
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
                y = _first_tensor(out)
                if y is not None:
                    acc.sum, acc.n = acc.sum.to(y.device), acc.n.to(y.device)
                    acc.add(y.detach(), width, self._bucket)
            return hook

        def head_hook(site: AttentionSite) -> Callable:
            def hook(_m: nn.Module, args: tuple) -> None:
                u = args[0]
                acc = self._heads.get(site.out)
                if acc is None:
                    self._check_memory(nb * site.heads * site.head_dim ** 2 * 8)
                    acc = self._heads[site.out] = HeadBlockAccumulator(
                        site.heads, site.head_dim, nb, self.config.accumulate_dtype, u.device)
                acc.add(u.detach(), self._bucket)
            return hook

        def block_hook(path: str, width: int) -> Callable:
            e_acc = self._energy.setdefault(f"{path}#in", EnergyAccumulator(nb, "cpu"))
            c_acc = self._cos.setdefault(path, EnergyAccumulator(nb, "cpu"))

            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
                h_in = args[0] if args else _first_tensor(kwargs)
                h_out = _first_tensor(out)
                if not isinstance(h_in, torch.Tensor) or h_out is None or h_in.shape != h_out.shape:
                    return
                dim = _channel_dim(h_in, width)
                for acc in (e_acc, c_acc):
                    acc.sum, acc.n = acc.sum.to(h_in.device), acc.n.to(h_in.device)
                e_acc.add(h_in.detach(), width, self._bucket)
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=dim)
                c_acc.sum[self._bucket] += cos.sum().double()
                c_acc.n[self._bucket] += cos.numel()
            return hook

        for site in self.sites.attention:
            for path in (site.q, site.k, site.v):
                handles.append(modules[path].register_forward_pre_hook(linear_pre_hook(path)))
            handles.append(modules[site.out].register_forward_hook(energy_hook(site.out, site.out_dim)))
            if self.config.attention_output_statistics:
                handles.append(modules[site.out].register_forward_pre_hook(head_hook(site)))
        for site in self.sites.feed_forward:
            handles.append(modules[site.down].register_forward_pre_hook(linear_pre_hook(site.down)))
            handles.append(modules[site.name].register_forward_hook(energy_hook(site.name, site.dim)))
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
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            for h in handles:
                h.remove()
            self._seen.clear()

    def finalize(self, propagation: dict[str, float] | None = None, probe_model: nn.Module | None = None) -> Calibration:
        """Freeze the statistics into a :class:`Calibration` (tensors moved to the CPU).

        Args:
            propagation: block propagation factors measured elsewhere.
            probe_model: the live model to measure them on now, by replaying the recorded calls
                (:func:`measure_propagation`); needs ``record_calls > 0``. Call outside :meth:`attach`.
        """
        probe_seconds = 0.0
        if probe_model is not None and propagation is None:
            if not self.recorded_calls:
                raise CalibrationError("propagation probing needs recorded calls: create the Calibrator with "
                                       "record_calls > 0 (CalibrationConfig.propagation_probe_calls)")
            started = time.perf_counter()
            with torch.no_grad():
                propagation = measure_propagation(probe_model, self.sites.blocks, self.recorded_calls,
                                                  noise=self.config.propagation_noise)
            probe_seconds = time.perf_counter() - started
            logger.info("propagation probing: %d blocks in %.1fs", len(propagation), probe_seconds)
        self.recorded_calls.clear()
        if self.num_forward_calls == 0:
            raise CalibrationError("no forward pass reached the model during calibration: the run function "
                                   "did not call it (check that it uses this model object)")
        hooked = [p for s in self.sites.attention for p in (s.q, s.k, s.v)] + [s.down for s in self.sites.feed_forward]
        never_ran = [p for p in hooked if p not in self._alias]
        if never_ran:
            raise CalibrationError(f"{len(never_ran)} layers never ran during calibration (e.g. {never_ran[0]})")
        thin = [key for key, acc in self._inputs.items() if acc.n.sum() < acc.dim]
        if thin:
            logger.warning("%d statistics saw fewer tokens than their width (e.g. %s): the least-squares refits are "
                           "under-determined; calibrate on more prompts or steps", len(thin), thin[0])
        tensors: dict[str, torch.Tensor] = {}
        for key, acc in self._inputs.items():
            tensors |= {f"input/{key}/xx": acc.xx.cpu(), f"input/{key}/x": acc.x.cpu(), f"input/{key}/n": acc.n.cpu()}
        for key, acc in self._heads.items():
            tensors |= {f"heads/{key}/xx": acc.xx.cpu(), f"heads/{key}/x": acc.x.cpu(), f"heads/{key}/n": acc.n.cpu()}
        for key, acc in self._energy.items():
            tensors |= {f"energy/{key}/sum": acc.sum.cpu(), f"energy/{key}/n": acc.n.cpu()}
        for key, acc in self._cos.items():
            tensors |= {f"cos/{key}/sum": acc.sum.cpu(), f"cos/{key}/n": acc.n.cpu()}
        meta = {
            "num_forward_calls": self.num_forward_calls,
            "seconds": round(time.perf_counter() - self._started, 3),  # statistics pass and probing together
            "probe_seconds": round(probe_seconds, 3),
            "memory_bytes": self.memory_bytes,
            "config": {k: (str(v) if isinstance(v, torch.dtype) else v) for k, v in asdict(self.config).items()},
        }
        logger.info("calibration: %d forward calls, %.1f MiB of statistics", self.num_forward_calls,
                    self.memory_bytes / 2**20)
        return Calibration(
            sites=self.sites,
            tensors=tensors,
            linear_inputs=dict(self._alias),
            tokens_per_row={p: s / max(c, 1) for p, (s, c) in self._tokens.items()},
            fingerprint=self.fingerprint,
            propagation=propagation,
            meta=meta,
        )


# --------------------------------------------------------------------------------------------------
# Propagation probing and the one-call API
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def measure_propagation(model: nn.Module, blocks: list[str], calls: list[tuple[tuple, dict]],
                        noise: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """π_b: relative change of the model output per unit relative perturbation of block b's output.

    Replays the recorded ``calls``; for each block adds isotropic noise of relative norm ``noise`` to the
    block output (per sample) and measures ``mean ‖Δout‖/‖out‖ / noise`` (method.md §4.1).
    """
    if not calls:
        raise CalibrationError("propagation probing needs recorded forward calls")
    modules = dict(model.named_modules())
    clean = [_first_tensor(model(*args, **kwargs)).float() for args, kwargs in calls]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    result: dict[str, float] = {}
    for block in blocks:
        def perturb(_m: nn.Module, _args: tuple, out: Any) -> Any:
            y = _first_tensor(out)
            n = torch.randn(y.shape, generator=gen, dtype=torch.float32).to(y.device)
            dims = tuple(range(1, y.dim()))
            y_norm = y.float().pow(2).sum(dim=dims, keepdim=True).sqrt()
            scale = noise * y_norm / n.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp_min(1e-12)
            y_new = y + (n * scale).to(y.dtype)
            if isinstance(out, torch.Tensor):
                return y_new
            if isinstance(out, tuple):
                return (y_new, *out[1:])
            raise CalibrationError(f"cannot perturb the output of {block} (type {type(out).__name__})")

        handle = modules[block].register_forward_hook(perturb)
        try:
            ratios = []
            for (args, kwargs), ref in zip(calls, clean):
                out = _first_tensor(model(*args, **kwargs)).float()
                ratios.append(((out - ref).norm() / ref.norm().clamp_min(1e-12)).item())
        finally:
            handle.remove()
        result[block] = sum(ratios) / len(ratios) / noise
    return result


def calibrate(model: nn.Module, run_fn: Callable[[], Any], config: CalibrationConfig | None = None,
              sites: Sites | None = None) -> Calibration:
    """Run ``run_fn`` (which drives forward passes through ``model``) and collect slimming statistics.

    Args:
        model: the original (uncompressed) denoiser, e.g. ``pipe.unet``.
        run_fn: a callable with no arguments that runs the model on calibration data, typically the
            pipeline's own sampling loop on the calibration prompts, with CFG on.
        config: what to collect; see :class:`CalibrationConfig`.
        sites: the groups to calibrate (default: :func:`find_sites(model) <find_sites>`).

    Returns:
        A :class:`Calibration`, reusable for slimming at any budget and savable with ``.save(path)``.
    """
    config = config or CalibrationConfig()
    calibrator = Calibrator(model, config, sites, record_calls=config.propagation_probe_calls)
    with torch.no_grad(), calibrator.attach(model):
        run_fn()
    return calibrator.finalize(probe_model=model if calibrator.recorded_calls else None)
