"""The Calibration: activation statistics of one model, its file format, validation and merging.

This module owns the calibration schema: the names of the statistics tensors (``StatKeys``), the JSON header
of the ``.safetensors`` file, and their validation. Everything else reads statistics through the typed
accessors of :class:`Calibration` (``input_moment``, ``output_energy``, ``block_input_energy``, ...).
The hooks that *collect* the statistics live in :mod:`.calibrator`.

All statistics are stored as *sums* per timestep bucket with their counts, so calibrations computed on
separate prompt shares (processes, machines) combine exactly by addition (:meth:`Calibration.merge`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CalibrationError, CalibrationMismatchError, SlimFileError, UnsupportedModelError
from .io_utils import atomic_path
from .moments import AugmentedMoment, combine_buckets
from .sites import AttentionSite, FeedForwardSite, Sites, find_sites

logger = logging.getLogger("slimdiff")

CALIBRATION_FORMAT = "slimdiff.calibration/1"
_HEADER_KEY = "slimdiff.calibration"


class StatKeys:
    """Names of the statistics tensors (the one place that spells them).

    * ``input/<key>/{xx,x,n}``: Σ xxᵀ, Σ x and token count of a Linear input (``key`` is the accumulator the
      Linear's input was deduplicated to, see ``Calibration.linear_inputs``);
    * ``heads/<to_out path>/{xx,x,n}``: the per-head diagonal blocks of the attention output's moment;
    * ``energy/<path>/{sum,n}``: Σ‖y‖² and token count of a group's output;
    * ``energy/<block>#in/{sum,n}``: the same for the residual stream entering a block;
    * ``cos/<block>/{sum,n}``: Σ cos(h_in, h_out) over tokens (block influence).
    """

    @staticmethod
    def input(key: str, part: str) -> str:
        return f"input/{key}/{part}"

    @staticmethod
    def heads(out_path: str, part: str) -> str:
        return f"heads/{out_path}/{part}"

    @staticmethod
    def energy(path: str, part: str) -> str:
        return f"energy/{path}/{part}"

    @staticmethod
    def block_input(block: str, part: str) -> str:
        return f"energy/{block}#in/{part}"

    @staticmethod
    def cos(block: str, part: str) -> str:
        return f"cos/{block}/{part}"


class ShardedTensors(Mapping):
    """Statistics kept in ``.safetensors`` files and read one tensor at a time, on access.

    Used when the statistics do not fit in memory at once: calibration in passes spills each pass's statistics
    to a shard, and :meth:`Calibration.load` of a large file reads it lazily. Slimming reads one group's moments
    at a time, so memory stays bounded by the largest group. ``keep_alive`` holds e.g. the temporary folder of
    the shards, removed when the mapping is garbage-collected.
    """

    def __init__(self, locations: dict[str, Path], keep_alive: Any = None):
        self._locations = dict(locations)
        self._keep_alive = keep_alive

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self._locations[key]
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._locations)

    def __len__(self) -> int:
        return len(self._locations)

    def describe(self, key: str) -> tuple[torch.dtype, tuple[int, ...]]:
        """dtype and shape of a tensor without reading it."""
        from safetensors import safe_open

        with safe_open(str(self._locations[key]), framework="pt", device="cpu") as f:
            piece = f.get_slice(key)
            return _SAFETENSORS_DTYPES[piece.get_dtype()], tuple(piece.get_shape())

    @classmethod
    def of_file(cls, path: str | Path, keep_alive: Any = None) -> ShardedTensors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            return cls({k: Path(path) for k in f.keys()}, keep_alive)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32}
_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def _stream_safetensors(tensors: Mapping, path: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` in the safetensors format, reading and writing one tensor at a time.

    ``safetensors.torch.save_file`` needs every tensor in memory at once; a calibration spilled to shards
    (tens of GB for Flux) must not. The layout is the format's own: an 8-byte little-endian header length, the
    JSON header (names → dtype, shape, byte offsets; ``__metadata__``), then the raw little-endian data.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    keys = sorted(tensors)
    for key in keys:
        dtype, shape = tensors.describe(key) if isinstance(tensors, ShardedTensors) else \
            (tensors[key].dtype, tuple(tensors[key].shape))
        size = math.prod(shape) * torch.finfo(dtype).bits // 8 if dtype.is_floating_point else \
            math.prod(shape) * torch.iinfo(dtype).bits // 8
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key in keys:
            t = tensors[key].detach().to("cpu").contiguous()
            f.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")


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
        _refuse_quantized(path, layer.weight)
        structure.append([path, layer.in_features, layer.out_features, layer.bias is not None])
        weight_sq.append(_squared_norm(layer.weight.detach()))
    digest = hashlib.sha256(json.dumps(structure).encode()).hexdigest()[:16]
    return {"model_class": type(model).__name__, "structure": digest, "weight_sq": weight_sq}


def _squared_norm(weight: torch.Tensor, block_bytes: int = 2**22) -> float:
    """Σ w² in fp64, a few rows at a time: a whole fp64 copy of SD1.5's 10240×1280 GEGLU projection and its
    square would be 210 MB of temporaries, at the moment the statistics are complete (plan_slim checks the model)."""
    rows = max(1, block_bytes // (8 * weight.shape[-1]))  # a Linear's (out, in) weight
    return float(sum(weight[i:i + rows].double().pow(2).sum() for i in range(0, weight.shape[0], rows)))


def _refuse_quantized(path: str, weight: torch.Tensor) -> None:
    """SlimDiff reads and rewrites full-precision weights: a quantized one (torchao, quanto, bitsandbytes tensor
    subclasses, or integer storage) would fail deep inside, or lose its quantization; say what to do instead."""
    if type(weight) in (torch.Tensor, nn.Parameter) and weight.is_floating_point():
        return
    raise UnsupportedModelError(
        f"{path}.weight is quantized ({type(weight).__name__}, {weight.dtype}): SlimDiff calibrates and slims "
        "full-precision models. Slim first, then quantize (torchao quantize_ on the slim model, or load the saved "
        "slim pipeline with quantization_config=...); see README 'Stacking with quantization, caching and compile'")


def compare_fingerprints(expected: dict[str, Any], actual: dict[str, Any], strict_weights: bool) -> str | None:
    """Why two fingerprints describe different models (None if they describe the same one)."""
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

    Attributes:
        sites: the groups the statistics describe.
        tensors: the statistics, named by :class:`StatKeys` (sums and counts per timestep bucket).
        linear_inputs: Linear path → the accumulator its input was recorded in (inputs that are the same
            tensor share one; see :meth:`shares_input`).
        tokens_per_row: Linear path → mean tokens per batch row of its input (FLOP costs).
        fingerprint: the model the statistics belong to (:meth:`check_compatible`).
        propagation: block → propagation factor π_b from the perturbation probe, or None.
        group_influence: group name (``"<site>:qk|vo|ffn"``) → measured influence α_g (method.md §4.1.1,
            :mod:`.influence`), or None when it was not measured.
        meta: free-form facts about the run (forward calls, seconds, settings).
    """

    sites: Sites
    tensors: dict[str, torch.Tensor]
    linear_inputs: dict[str, str]
    tokens_per_row: dict[str, float]
    fingerprint: dict[str, Any]
    propagation: dict[str, float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    group_influence: dict[str, float] | None = None

    # -- accessors ---------------------------------------------------------------------------------

    @property
    def num_buckets(self) -> int:
        first = next(k for k in self.tensors if k.endswith("/n"))
        return self.tensors[first].numel()

    @property
    def nbytes(self) -> int:
        if isinstance(self.tensors, ShardedTensors):
            return sum(math.prod(shape) * (torch.finfo(dtype).bits // 8)
                       for dtype, shape in (self.tensors.describe(k) for k in self.tensors))
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def _moment(self, xx_key: str, x_key: str, n_key: str, what: str,
                weighting: str | list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.tensors[n_key]
        if n.sum() <= 0:
            raise CalibrationError(f"no activations were recorded for {what}: the calibration run never executed it")
        # fp64 whatever the accumulation dtype was (CalibrationConfig.accumulate_dtype): the decompositions are fp64
        xx = combine_buckets(self.tensors[xx_key].double(), n, weighting)
        x = combine_buckets(self.tensors[x_key].double(), n, weighting)
        return xx, x

    def input_moment(self, linear_path: str, weighting: str | list[float] = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
        """(E[xxᵀ], E[x]) of the input of the Linear at ``linear_path``, fp64."""
        key = self._input_key(linear_path)
        return self._moment(StatKeys.input(key, "xx"), StatKeys.input(key, "x"), StatKeys.input(key, "n"),
                            linear_path, weighting)

    def augmented_input_moment(self, linear_path: str, weighting: str | list[float] = "tokens") -> torch.Tensor:
        """E[[x, 1][x, 1]ᵀ], (m + 1)² fp64, of the input of the Linear at ``linear_path``.

        The same numbers as ``augment(*input_moment(...))``, built in one (m + 1)² allocation: for a Flux.1-dev
        feed-forward (m = 12288) each fp64 m² temporary would be 1.2 GB.
        """
        return self.augmented_input_blocks(linear_path, weighting).full()

    def augmented_input_blocks(self, linear_path: str, weighting: str | list[float] = "tokens",
                               device: torch.device | str | None = None) -> AugmentedMoment:
        """The augmented input moment of the Linear at ``linear_path`` as an :class:`AugmentedMoment`: any block
        of it (a principal submatrix, rows in another order) built straight from the sums, on ``device``.

        It holds the statistics by reference (spilled statistics: one read of the shard), not a copy of the matrix.
        """
        key = self._input_key(linear_path)
        n = self.tensors[StatKeys.input(key, "n")]
        if n.sum() <= 0:
            raise CalibrationError(f"no activations were recorded for {linear_path}: the calibration run never executed it")
        return AugmentedMoment(self.tensors[StatKeys.input(key, "xx")], self.tensors[StatKeys.input(key, "x")], n,
                               weighting, device=device)

    def release_input(self, linear_path: str) -> None:
        """Drop the second moment and mean of a Linear's input, for a caller that owns this calibration and
        will not read them again (``plan_slim(..., release_statistics=True)``); reading them afterwards raises."""
        key = self._input_key(linear_path)
        if isinstance(self.tensors, dict):
            for part in ("xx", "x"):
                self.tensors.pop(StatKeys.input(key, part), None)
        self.meta.setdefault("released", []).append(linear_path)

    def _input_key(self, linear_path: str) -> str:
        try:
            key = self.linear_inputs[linear_path]
        except KeyError:
            raise CalibrationError(f"the calibration has no statistics for {linear_path}") from None
        if isinstance(self.tensors, dict) and StatKeys.input(key, "xx") not in self.tensors:
            if linear_path in self.meta.get("released", ()) or key in self.meta.get("released", ()):
                raise CalibrationError(f"the statistics of {linear_path} were released by plan_slim(release_statistics="
                                       "True): that calibration cannot be used again")
        return key

    def shares_input(self, linear_a: str, linear_b: str) -> bool:
        """Whether two Linears read the same tensor (e.g. q and k of a self-attention)."""
        return self.linear_inputs.get(linear_a) == self.linear_inputs.get(linear_b) is not None

    def attention_output_moment(self, site: AttentionSite, weighting: str | list[float] = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (E[uuᵀ], E[u]) of the attention output u (input of ``to_out[0]``), shapes (H,dh,dh), (H,dh)."""
        if StatKeys.heads(site.out, "n") not in self.tensors:
            raise CalibrationError("the calibration has no attention-output statistics "
                                   "(re-run with attention_output_statistics=True)")
        return self._moment(StatKeys.heads(site.out, "xx"), StatKeys.heads(site.out, "x"),
                            StatKeys.heads(site.out, "n"), site.out, weighting)

    def head_output_moment(self, out_path: str, weighting: str | list[float] = "tokens") -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head (E[uuᵀ], E[u]) of the head outputs read by the Linear at ``out_path`` (a joint attention has
        two readers: ``to_out.0`` for the first stream's queries, ``to_add_out`` for the second's)."""
        if StatKeys.heads(out_path, "n") not in self.tensors:
            raise CalibrationError("the calibration has no attention-output statistics for "
                                   f"{out_path} (re-run with attention_output_statistics=True)")
        return self._moment(StatKeys.heads(out_path, "xx"), StatKeys.heads(out_path, "x"),
                            StatKeys.heads(out_path, "n"), out_path, weighting)

    def _energy(self, sum_key: str, n_key: str, what: str, weighting: str | list[float]) -> float:
        if n_key not in self.tensors:
            raise CalibrationError(f"the calibration has no output energy for {what}")
        return float(combine_buckets(self.tensors[sum_key].double(), self.tensors[n_key], weighting))

    def output_energy(self, path: str, weighting: str | list[float] = "tokens") -> float:
        """Mean squared norm per token of the output of the group module at ``path`` (``to_out.0`` / FFN)."""
        return self._energy(StatKeys.energy(path, "sum"), StatKeys.energy(path, "n"), path, weighting)

    def block_input_energy(self, block: str, weighting: str | list[float] = "tokens") -> float:
        """Mean squared norm per token of the residual stream entering ``block``."""
        return self._energy(StatKeys.block_input(block, "sum"), StatKeys.block_input(block, "n"),
                            f"the input of {block}", weighting)

    def block_influence(self, block: str) -> float:
        """MoDeGPT's block influence 1 − E[cos(h_in, h_out)]."""
        n = self.tensors[StatKeys.cos(block, "n")].sum().clamp_min(1.0)
        return float(1.0 - self.tensors[StatKeys.cos(block, "sum")].sum() / n)

    def propagation_factor(self, block: str) -> float:
        """π_b measured by the perturbation probe."""
        self.require_propagation()
        return self.propagation[block]

    def require_group_influence(self) -> None:
        """Raise :class:`CalibrationError` (saying how to get it) when the group influence was not measured."""
        if self.group_influence is None:
            raise CalibrationError("propagation='measured' needs a calibration with measured group influence "
                                   "(CalibrationConfig.group_influence=True and propagation_probe_calls > 0); or "
                                   "use propagation='probe'")

    def require_propagation(self) -> None:
        """Raise :class:`CalibrationError` (saying how to get them) when the block factors were not probed."""
        if self.propagation is None:
            raise CalibrationError("propagation='probe' needs a calibration with propagation probing "
                                   "(CalibrationConfig.propagation_probe_calls > 0); or use "
                                   "propagation='block_influence'")

    def measured_influence(self, group: str) -> float:
        """α_g measured by slimming the group alone (method.md §4.1.1)."""
        self.require_group_influence()
        if group not in self.group_influence:
            raise CalibrationError(f"the calibration has no measured influence for {group}: calibrate again")
        return self.group_influence[group]

    # -- compatibility -----------------------------------------------------------------------------

    def check_compatible(self, model: nn.Module, strict_weights: bool = True) -> None:
        """Raise :class:`CalibrationMismatchError` if this calibration was not computed on ``model``."""
        sites = find_sites(model)
        problem = compare_fingerprints(self.fingerprint, model_fingerprint(model, sites), strict_weights)
        if problem:
            raise CalibrationMismatchError(
                f"This calibration does not belong to the given model: {problem}. "
                "Calibrate this model (or load the calibration made for it) before slimming."
            )

    # -- combining ---------------------------------------------------------------------------------

    @classmethod
    def merge(cls, calibrations: list[Calibration]) -> Calibration:
        """Combine calibrations of the same model made on separate prompt shares, by exact sums.

        Moments, counts, energies and cosines add; tokens per row are averaged by forward calls. The
        propagation factors and measured group influences are the first calibration's: the probes replay the
        first recorded calls of a run, so merging the shares of one prompt list in their order gives what a single
        run would have measured (the influences' reference factors come from the first share's statistics).
        Raises :class:`CalibrationMismatchError` for calibrations of different models or settings.
        """
        if not calibrations:
            raise CalibrationError("nothing to merge")
        first = calibrations[0]
        for i, other in enumerate(calibrations[1:], start=2):
            problem = compare_fingerprints(first.fingerprint, other.fingerprint, strict_weights=True)
            if problem is None and other.sites != first.sites:
                problem = "it lists other attention / feed-forward groups"
            if problem is None and other.linear_inputs != first.linear_inputs:
                problem = "its layers share inputs differently (another model wiring)"
            if problem is None and other.tensors.keys() != first.tensors.keys():
                problem = "it holds other statistics (different calibration settings)"
            mine, theirs = first.meta.get("config", {}), other.meta.get("config", {})
            for setting in _MERGE_SETTINGS:
                if problem is None and mine.get(setting) != theirs.get(setting):
                    problem = f"it was made with {setting}={theirs.get(setting)!r}, not {mine.get(setting)!r}"
            if problem is None:
                shapes = [k for k, t in first.tensors.items() if other.tensors[k].shape != t.shape]
                if shapes:
                    problem = f"its statistics have other shapes ({shapes[0]})"
            if problem:
                raise CalibrationMismatchError(f"cannot merge calibration {i} into calibration 1: {problem}")
        tensors = {k: sum((c.tensors[k].double() for c in calibrations[1:]), first.tensors[k].double())
                   .to(first.tensors[k].dtype) for k in first.tensors}
        calls = [max(int(c.meta.get("num_forward_calls", 1)), 1) for c in calibrations]
        tokens = {p: sum(c.tokens_per_row[p] * n for c, n in zip(calibrations, calls)) / sum(calls)
                  for p in first.tokens_per_row}
        meta = dict(first.meta)
        meta["num_forward_calls"] = sum(int(c.meta.get("num_forward_calls", 0)) for c in calibrations)
        meta["seconds"] = round(sum(float(c.meta.get("seconds", 0.0)) for c in calibrations), 3)
        meta["merged_from"] = len(calibrations)
        return cls(sites=first.sites, tensors=tensors, linear_inputs=dict(first.linear_inputs), tokens_per_row=tokens,
                   fingerprint=first.fingerprint, propagation=first.propagation, meta=meta,
                   group_influence=first.group_influence)

    # -- persistence -------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the calibration to one ``.safetensors`` file (atomically)."""
        from safetensors.torch import save_file

        if self.meta.get("released"):
            raise CalibrationError("this calibration's feed-forward statistics were released by plan_slim("
                                   "release_statistics=True): save it before planning")

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
            "group_influence": self.group_influence,
            "meta": self.meta,
        }
        with atomic_path(path) as tmp:
            if isinstance(self.tensors, ShardedTensors):  # spilled statistics: never all in memory at once
                _stream_safetensors(self.tensors, tmp, {_HEADER_KEY: json.dumps(header)})
            else:
                tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
                save_file(tensors, str(tmp), metadata={_HEADER_KEY: json.dumps(header)})
        logger.info("saved calibration to %s", path)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", lazy: bool | None = None) -> Calibration:
        """Read a file written by :meth:`save`, validating its header and every statistic.

        Args:
            lazy: read statistics on access instead of all at once (bounded memory for large calibrations);
                default: lazy for files over 1 GiB.

        Raises :class:`SlimFileError` (naming the file, the entry and what to do) for anything else: foreign or
        corrupt files, a malformed header, missing or mis-shaped statistics, NaN/inf values.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"calibration file not found: {path}")
        if lazy is None:
            lazy = path.stat().st_size > 2**30
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                metadata = f.metadata() or {}
                tensors = ShardedTensors.of_file(path) if lazy else {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises several types for corrupt files
            raise SlimFileError(f"{path} is not a readable safetensors file ({exc})") from exc
        if _HEADER_KEY not in metadata:
            raise SlimFileError(f"{path} is a safetensors file but not a SlimDiff calibration")
        try:
            header = json.loads(metadata[_HEADER_KEY])
        except json.JSONDecodeError as exc:
            raise SlimFileError(f"{path}: the calibration header is not valid JSON ({exc}); the file is damaged, "
                                "calibrate again") from exc
        if not isinstance(header, dict) or header.get("format") != CALIBRATION_FORMAT:
            found = header.get("format") if isinstance(header, dict) else None
            raise SlimFileError(f"{path} has calibration format {found!r}; "
                                f"this version of SlimDiff reads {CALIBRATION_FORMAT!r}")
        calibration = _from_header(header, tensors, path)
        validate_statistics(calibration, source=str(path))
        return calibration


_MERGE_SETTINGS = ("num_timestep_buckets", "num_train_timesteps", "accumulate_dtype", "attention_output_statistics")


def _from_header(header: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> Calibration:
    """Build a Calibration from a parsed header, turning every schema violation into a SlimFileError."""
    def fail(entry: str, problem: str) -> SlimFileError:
        return SlimFileError(f"{path}: header entry {entry!r} {problem}; the file is damaged or was not written by "
                             "SlimDiff: calibrate again")

    for entry, kind in (("sites", dict), ("linear_inputs", dict), ("tokens_per_row", dict), ("fingerprint", dict),
                        ("meta", dict)):
        if not isinstance(header.get(entry), kind):
            raise fail(entry, f"is missing or not a {kind.__name__}")
    s = header["sites"]
    try:
        sites = Sites(
            attention=[AttentionSite(**a) for a in s["attention"]],
            feed_forward=[FeedForwardSite(**f) for f in s["feed_forward"]],
            skipped=[tuple(x) for x in s.get("skipped", [])],
        )
    except (KeyError, TypeError) as exc:
        raise fail("sites", f"is malformed ({exc})") from exc
    for site in sites.attention:
        ints = (site.heads, site.head_dim, site.query_dim, site.kv_dim, site.out_dim)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in ints) or \
                not isinstance(site.name, str) or not isinstance(site.block, str):
            raise fail("sites", f"has an invalid attention entry {site.name!r}")
    for site in sites.feed_forward:
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (site.dim, site.inner_dim)):
            raise fail("sites", f"has an invalid feed-forward entry {site.name!r}")
    fingerprint = header["fingerprint"]
    if not {"model_class", "structure", "weight_sq"} <= fingerprint.keys() or \
            len(fingerprint["weight_sq"]) != len(sites.linear_paths()):
        raise fail("fingerprint", "does not match the listed groups")
    propagation = header.get("propagation")
    if propagation is not None:
        if not isinstance(propagation, dict) or set(propagation) != set(sites.blocks) or \
                not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in propagation.values()):
            raise fail("propagation", "must give a finite, non-negative factor for every block")
    group_influence = header.get("group_influence")
    if group_influence is not None:
        names = {f"{a.name}:{kind}" for a in sites.attention for kind in ("qk", "vo")} | \
            {f"{f.name}:ffn" for f in sites.feed_forward}
        if not isinstance(group_influence, dict) or not set(group_influence) <= names or \
                not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in group_influence.values()):
            raise fail("group_influence", "must give finite, non-negative influences of the listed groups")
    tokens = header["tokens_per_row"]
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in tokens.values()):
        raise fail("tokens_per_row", "must hold positive finite numbers")
    return Calibration(sites=sites, tensors=tensors, linear_inputs=header["linear_inputs"], tokens_per_row=tokens,
                       fingerprint=fingerprint, propagation=propagation, meta=header["meta"],
                       group_influence=group_influence)


def validate_statistics(calibration: Calibration, source: str = "calibration") -> None:
    """Check that every statistic the sites need is present, of the right shape, finite and non-negative.

    Raises :class:`SlimFileError` naming ``source``, the tensor and the fix. Runs before any decomposition, so
    a damaged file never surfaces as a linear-algebra error deep inside slimming.
    """
    t = calibration.tensors

    def fail(entry: str, problem: str) -> SlimFileError:
        return SlimFileError(f"{source}: statistic {entry!r} {problem}. The calibration is damaged or incomplete: "
                             "calibrate the model again")

    n_keys = [k for k in t if k.endswith("/n")]
    if not n_keys:
        raise fail("*/n", "is missing (the file holds no statistics)")
    buckets = t[n_keys[0]].numel()


    def need(key: str, shape: tuple[int, ...]) -> None:
        if key not in t:
            raise fail(key, "is missing")
        dtype, found = t.describe(key) if isinstance(t, ShardedTensors) else (t[key].dtype, tuple(t[key].shape))
        if found != shape:
            raise fail(key, f"has shape {found}, expected {shape}")
        if not dtype.is_floating_point:
            raise fail(key, f"has dtype {dtype}, expected a floating-point dtype")

    widths: dict[str, int] = {}
    for site in calibration.sites.attention:
        widths |= {site.q: site.query_dim, site.k: site.kv_dim, site.v: site.kv_dim}
        if site.is_joint:
            widths |= dict.fromkeys((site.add_q, site.add_k, site.add_v), site.context_dim)
    for site in calibration.sites.feed_forward:
        widths[site.hidden_key] = site.inner_dim
    for path, width in widths.items():
        key = calibration.linear_inputs.get(path)
        if not isinstance(key, str):
            raise fail(StatKeys.input(path, "xx"), f"is not mapped for {path} (linear_inputs)")
        need(StatKeys.input(key, "xx"), (buckets, width, width))
        need(StatKeys.input(key, "x"), (buckets, width))
        need(StatKeys.input(key, "n"), (buckets,))
    for site in calibration.sites.attention:
        for out_path in site.output_paths:
            need(StatKeys.energy(out_path, "sum"), (buckets,))
            need(StatKeys.energy(out_path, "n"), (buckets,))
            if StatKeys.heads(out_path, "n") in t:
                need(StatKeys.heads(out_path, "xx"), (buckets, site.heads, site.head_dim, site.head_dim))
                need(StatKeys.heads(out_path, "x"), (buckets, site.heads, site.head_dim))
                need(StatKeys.heads(out_path, "n"), (buckets,))
    for site in calibration.sites.feed_forward:
        need(StatKeys.energy(site.name, "sum"), (buckets,))
        need(StatKeys.energy(site.name, "n"), (buckets,))
    for block in calibration.sites.blocks:
        for key in (StatKeys.block_input(block, "sum"), StatKeys.block_input(block, "n"),
                    StatKeys.cos(block, "sum"), StatKeys.cos(block, "n")):
            need(key, (buckets,))
    for key in t:  # one tensor at a time (a lazily read calibration never holds them all)
        tensor = t[key]
        if not torch.isfinite(tensor).all():
            raise fail(key, "contains NaN or inf")
        if (key.endswith("/n") or "/sum" in key and key.startswith("energy/")) and (tensor < 0).any():
            raise fail(key, "is negative")
