"""Node widget values -> core settings (pure python: testable without ComfyUI)."""
from __future__ import annotations

from typing import Any

from slimdiff_diffusers.core import SlimConfig
from slimdiff_diffusers.core.errors import BudgetError, ConfigError

from .node_specs import SLIM_CONFIG_COMBOS, SLIM_MODEL, TARGET_CHOICES

# What each "targets" choice of SlimDiff Slim means for the core SlimConfig.
TARGETS: dict[str, dict[str, Any]] = {
    "attention+ffn": {"targets": ("qk", "vo", "ffn")},
    # attn2 left whole: IP-Adapter-style patches compute their own keys/values against attn2's queries.
    "attention+ffn, keep cross-attention": {"targets": ("qk", "vo", "ffn"), "exclude": [r".*\.attn2"]},
    "attention": {"targets": ("qk", "vo")},
    "ffn": {"targets": ("ffn",)},
}
if tuple(TARGETS) != TARGET_CHOICES:  # the spec (what users see) and this mapping must list the same choices
    raise RuntimeError("node_inputs.TARGETS and node_specs.TARGET_CHOICES differ")


def parse_prompt_list(prompts: str) -> list[str]:
    """One prompt per non-empty line, surrounding whitespace removed."""
    return [line.strip() for line in prompts.splitlines() if line.strip()]


def slim_config_for(keep_ratio: float, params_to_remove_millions: float, targets: str,
                    **options: str | None) -> SlimConfig:
    """The core SlimConfig for SlimDiff Slim's widgets.

    ``head_layout="uniform"``: one per-head width per attention with the softmax scale folded into ``to_q``,
    so every ComfyUI attention backend and attention patch keeps working unchanged.

    Args:
        options: the values of the node's SlimConfig combos (``node_specs.SLIM_CONFIG_COMBOS``), passed to
            SlimConfig as they are; one that is absent or None takes SlimConfig's default.

    Raises:
        BudgetError: keep_ratio outside (0, 1] or a negative parameter budget (message names the node).
        ConfigError: a combo value SlimConfig does not accept (V3 combos are not checked by ComfyUI 0.3.64).
        ValueError: unknown targets, or an option the node does not offer.
    """
    node = SLIM_MODEL.display_name
    if targets not in TARGETS:
        raise ValueError(f"{node}: unknown targets {targets!r}; choose one of {list(TARGETS)}")
    unknown = sorted(set(options) - set(SLIM_CONFIG_COMBOS))
    if unknown:
        raise ValueError(f"{node}: unknown setting(s) {', '.join(unknown)}; it offers {', '.join(SLIM_CONFIG_COMBOS)}")
    if params_to_remove_millions < 0:
        raise BudgetError(f"{node}: params_to_remove_millions must be >= 0, got {params_to_remove_millions}")
    if params_to_remove_millions > 0:
        budget: dict[str, Any] = {"params_to_remove": int(round(params_to_remove_millions * 1e6))}
    else:
        if not 0.0 < keep_ratio <= 1.0:
            raise BudgetError(f"{node}: keep_ratio must be in (0, 1], got {keep_ratio}")
        budget = {"keep_ratio": float(keep_ratio)}
    chosen = {name: value for name, value in options.items() if value is not None}
    try:
        return SlimConfig(**budget, **TARGETS[targets], **chosen, head_layout="uniform")
    except (BudgetError, ConfigError) as exc:
        raise type(exc)(f"{node}: {exc}") from exc
