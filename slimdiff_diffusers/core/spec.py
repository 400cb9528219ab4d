"""SlimSpec: the widths a slimmed model actually has, per module. Enough to rebuild its layer shapes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SlimSpecError

SPEC_VERSION = 1
HEAD_LAYOUTS = ("separate", "uniform")
# Which layers a spec entry narrows (the paths follow from the entry's module path, see :mod:`.slim_state`):
#   attention "plain":  to_q/to_k (qk width), to_v (vo width), to_out.0 columns
#   attention "joint":  the same, plus add_q_proj/add_k_proj (qk), add_v_proj (vo) and to_add_out columns when
#                       the block has one (SD3/Flux joint attention)
#   attention "single": to_q/to_k/to_v, and the first heads·vo columns of the parent block's proj_out (Flux)
#   feed_forward "plain":  net.0.proj (or net.0.0) rows, the down projection's columns
#   feed_forward "single": the block's proj_mlp rows and the last `width` columns of its proj_out (Flux)
ATTENTION_KINDS = ("plain", "joint", "single")
FEED_FORWARD_KINDS = ("plain", "single")
_FIX = ("re-export the model with save_pretrained / save_slim_unet_file, or re-download it; "
        "slim specs are written by SlimDiff and should not be edited by hand")


@dataclass
class AttentionSpec:
    """Widths of one slimmed attention module.

    ``qk_rank``/``vo_rank`` are the per-head ranks of the decomposition. In the ``"uniform"`` layout every
    projection has ``width`` = max(qk_rank, vo_rank) per head (zero-padded) and ``to_q`` carries the
    softmax-scale correction; in ``"separate"`` q/k have ``qk_rank`` and v/o ``vo_rank`` per head.
    """

    heads: int
    head_dim: int
    qk_rank: int
    vo_rank: int
    layout: str = "separate"
    kind: str = "plain"

    @property
    def qk_width(self) -> int:
        return self.qk_rank if self.layout == "separate" else max(self.qk_rank, self.vo_rank)

    @property
    def vo_width(self) -> int:
        return self.vo_rank if self.layout == "separate" else max(self.qk_rank, self.vo_rank)


@dataclass
class FeedForwardSpec:
    """Kept hidden channels of one feed-forward module."""

    inner_dim: int
    width: int
    gated: bool
    kind: str = "plain"


@dataclass
class SlimSpec:
    """Per-module widths of a slimmed model (``attention`` and ``feed_forward`` keyed by module path)."""

    attention: dict[str, AttentionSpec] = field(default_factory=dict)
    feed_forward: dict[str, FeedForwardSpec] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        # `kind` is written only when it is not "plain", so UNet specs read the same as before it existed.
        def entry(value: Any) -> dict[str, Any]:
            d = asdict(value)
            if d.get("kind") == "plain":
                del d["kind"]
            return d
        return {"version": self.version,
                "attention": {k: entry(v) for k, v in self.attention.items()},
                "feed_forward": {k: entry(v) for k, v in self.feed_forward.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Any, source: str = "slim spec") -> SlimSpec:
        """Parse and validate a spec dict (schema, types, ranges). ``source`` names the file in error messages.

        Raises :class:`SlimSpecError` naming the entry and the fix. Consistency with a model (module paths,
        full widths) is checked where the spec is applied (:func:`~slimdiff_diffusers.core.apply_slim_spec`).
        """
        if not isinstance(data, dict):
            raise SlimSpecError(f"{source}: the slim spec must be a JSON object, got {type(data).__name__}; {_FIX}")
        version = data.get("version")
        if version != SPEC_VERSION or isinstance(version, bool):
            newer = isinstance(version, int) and not isinstance(version, bool) and version > SPEC_VERSION
            raise SlimSpecError(f"{source}: slim spec version {version!r} is not supported (this SlimDiff reads "
                                f"{SPEC_VERSION}); " + ("upgrade slimdiff-diffusers" if newer else _FIX))
        unknown = sorted(set(data) - {"version", "attention", "feed_forward"})
        if unknown:
            raise SlimSpecError(f"{source}: unknown slim spec entries {unknown}; {_FIX}")
        sections = {}
        for section in ("attention", "feed_forward"):
            entries = data.get(section, {})
            if not isinstance(entries, dict):
                raise SlimSpecError(f"{source}: slim spec '{section}' must map module paths to entries, got "
                                    f"{type(entries).__name__}; {_FIX}")
            sections[section] = entries
        return cls(attention={path: _attention_entry(path, entry, source)
                              for path, entry in sections["attention"].items()},
                   feed_forward={path: _feed_forward_entry(path, entry, source)
                                 for path, entry in sections["feed_forward"].items()},
                   version=version)

    @classmethod
    def from_json(cls, text: str, source: str = "slim spec") -> SlimSpec:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, TypeError) as exc:
            raise SlimSpecError(f"{source}: the slim spec is not valid JSON ({exc}); {_FIX}") from exc
        return cls.from_dict(data, source)


def _fields(path: str, entry: Any, section: str, required: tuple[str, ...], optional: tuple[str, ...],
            source: str) -> dict[str, Any]:
    if not isinstance(path, str) or not path:
        raise SlimSpecError(f"{source}: slim spec {section} entry has an invalid module path {path!r}; {_FIX}")
    if not isinstance(entry, dict):
        raise SlimSpecError(f"{source}: slim spec {section} entry {path!r} must be an object, got "
                            f"{type(entry).__name__}; {_FIX}")
    missing = [k for k in required if k not in entry]
    unknown = sorted(set(entry) - set(required) - set(optional))
    if missing or unknown:
        what = ", ".join(([f"missing {missing}"] if missing else []) + ([f"unknown {unknown}"] if unknown else []))
        raise SlimSpecError(f"{source}: slim spec {section} entry {path!r} has {what} fields; {_FIX}")
    return entry


def _positive_int(value: Any, name: str, path: str, section: str, source: str, at_most: int | None = None,
                  limit_name: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SlimSpecError(f"{source}: slim spec {section} entry {path!r}: {name} must be an integer, got "
                            f"{value!r}; {_FIX}")
    if value < 1:
        raise SlimSpecError(f"{source}: slim spec {section} entry {path!r}: {name} must be >= 1, got {value} "
                            f"(a zero width cannot run); {_FIX}")
    if at_most is not None and value > at_most:
        raise SlimSpecError(f"{source}: slim spec {section} entry {path!r}: {name} = {value} is larger than the "
                            f"full width {limit_name} = {at_most}; {_FIX}")
    return value


def _attention_entry(path: str, entry: Any, source: str) -> AttentionSpec:
    entry = _fields(path, entry, "attention", ("heads", "head_dim", "qk_rank", "vo_rank"), ("layout", "kind"), source)
    heads = _positive_int(entry["heads"], "heads", path, "attention", source)
    head_dim = _positive_int(entry["head_dim"], "head_dim", path, "attention", source)
    qk = _positive_int(entry["qk_rank"], "qk_rank", path, "attention", source, head_dim, "head_dim")
    vo = _positive_int(entry["vo_rank"], "vo_rank", path, "attention", source, head_dim, "head_dim")
    layout = entry.get("layout", "separate")
    if layout not in HEAD_LAYOUTS:
        raise SlimSpecError(f"{source}: slim spec attention entry {path!r}: unknown head layout {layout!r} "
                            f"(known: {', '.join(HEAD_LAYOUTS)}); the file may come from a newer SlimDiff: "
                            "upgrade slimdiff-diffusers, or re-export it")
    kind = _kind(entry, ATTENTION_KINDS, path, "attention", source)
    if kind != "plain" and layout != "separate":
        raise SlimSpecError(f"{source}: slim spec attention entry {path!r}: {kind} attention is only written in the "
                            f"'separate' head layout, not {layout!r}; {_FIX}")
    return AttentionSpec(heads, head_dim, qk, vo, layout=layout, kind=kind)


def _kind(entry: dict[str, Any], known: tuple[str, ...], path: str, section: str, source: str) -> str:
    kind = entry.get("kind", "plain")
    if kind not in known:
        raise SlimSpecError(f"{source}: slim spec {section} entry {path!r}: unknown kind {kind!r} (known: "
                            f"{', '.join(known)}); the file may come from a newer SlimDiff: upgrade "
                            "slimdiff-diffusers, or re-export it")
    return kind


def _feed_forward_entry(path: str, entry: Any, source: str) -> FeedForwardSpec:
    entry = _fields(path, entry, "feed_forward", ("inner_dim", "width", "gated"), ("kind",), source)
    inner = _positive_int(entry["inner_dim"], "inner_dim", path, "feed_forward", source)
    width = _positive_int(entry["width"], "width", path, "feed_forward", source, inner, "inner_dim")
    if not isinstance(entry["gated"], bool):
        raise SlimSpecError(f"{source}: slim spec feed_forward entry {path!r}: gated must be true or false, got "
                            f"{entry['gated']!r}; {_FIX}")
    kind = _kind(entry, FEED_FORWARD_KINDS, path, "feed_forward", source)
    if kind == "single" and entry["gated"]:
        raise SlimSpecError(f"{source}: slim spec feed_forward entry {path!r}: a single-stream MLP is not gated; {_FIX}")
    return FeedForwardSpec(inner, width, entry["gated"], kind=kind)
