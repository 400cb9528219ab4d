"""SlimSpec: the widths a slimmed model actually has, per module. Enough to rebuild its layer shapes."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import SlimFileError

SPEC_VERSION = 1


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


@dataclass
class SlimSpec:
    """Per-module widths of a slimmed model (``attention`` and ``feed_forward`` keyed by module path)."""

    attention: dict[str, AttentionSpec] = field(default_factory=dict)
    feed_forward: dict[str, FeedForwardSpec] = field(default_factory=dict)
    version: int = SPEC_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version,
                "attention": {k: asdict(v) for k, v in self.attention.items()},
                "feed_forward": {k: asdict(v) for k, v in self.feed_forward.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlimSpec:
        version = data.get("version")
        if version != SPEC_VERSION:
            raise SlimFileError(f"slim spec version {version!r} is not supported (this SlimDiff reads {SPEC_VERSION})")
        try:
            return cls(attention={k: AttentionSpec(**v) for k, v in data["attention"].items()},
                       feed_forward={k: FeedForwardSpec(**v) for k, v in data["feed_forward"].items()},
                       version=version)
        except (KeyError, TypeError) as exc:
            raise SlimFileError(f"malformed slim spec: {exc}") from exc

    @classmethod
    def from_json(cls, text: str) -> SlimSpec:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SlimFileError(f"slim spec is not valid JSON: {exc}") from exc
