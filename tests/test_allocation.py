"""The rank allocator (core/allocation.py): the greedy SIS descent and the refill of the budget it leaves."""
from __future__ import annotations

import itertools

import pytest
import torch

from slimdiff_diffusers.core.allocation import RankGroup, allocate_sis, allocate_uniform, rank_grid


def _group(name: str, full: int, step: int, slope: float, influence: float, decay: float,
           fixed: int | None = None) -> RankGroup:
    """A group whose relative error falls off geometrically with its rank (a sorted spectrum's tail energy)."""
    ranks = torch.arange(full + 1, dtype=torch.float64)
    errors = (decay ** ranks - decay ** full) / (1 - decay ** full)
    return RankGroup(name, rank_grid(full, step, step), slope, errors, influence, fixed=fixed)


def _cost(groups: list[RankGroup], ranks: dict[str, int]) -> float:
    return sum(g.cost(ranks[g.name]) for g in groups)


def _sis(groups: list[RankGroup], ranks: dict[str, int]) -> float:
    return sum(g.sis(ranks[g.name]) for g in groups)


def test_refill_spends_what_the_descent_overshot():
    # One wide FFN-like group (steps of 64 channels, 10 parameters each) and two narrow head-like groups (steps
    # of 8): the descent's last step removes a whole FFN step, far more than the budget asked for.
    groups = [_group("ffn", 384, 64, 10.0, 1.0, 0.99),
              _group("a", 32, 8, 1.0, 0.01, 0.9),
              _group("b", 32, 8, 1.0, 0.005, 0.9)]
    full = _cost(groups, {g.name: g.full for g in groups})
    budget = 0.6 * full
    descent = allocate_sis(groups, budget, refinement="none")
    refilled = allocate_sis(groups, budget, refinement="refill")
    assert _cost(groups, descent) <= budget and _cost(groups, refilled) <= budget + 1e-9
    assert budget - _cost(groups, descent) >= 8, "the case must leave at least one narrow step of budget unused"
    assert refilled != descent, "the refill should raise a group back up"
    assert all(refilled[n] >= descent[n] for n in descent), "the refill only raises ranks"
    assert _cost(groups, refilled) > _cost(groups, descent)
    assert _sis(groups, refilled) < _sis(groups, descent)
    # What is left is smaller than every step that would still lower the objective.
    left = budget - _cost(groups, refilled)
    for g in groups:
        i = g.grid.index(refilled[g.name])
        if i + 1 < len(g.grid) and g.sis(g.grid[i]) > g.sis(g.grid[i + 1]):
            assert g.cost(g.grid[i + 1]) - g.cost(g.grid[i]) > left


@pytest.mark.parametrize("keep", [0.8, 0.6, 0.4])
def test_uniform_allocation_spends_the_budget_with_the_same_fraction_rounded_either_way(keep):
    # flux-tiny's grids: heads of 32 in steps of 8 (expensive per rank unit), FFNs of 384 in steps of 64. Rounding
    # one fraction to these grids alone kept 0.68 / 0.50 / 0.37 of them at keep 0.8 / 0.6 / 0.4.
    groups = [_group(f"vo{i}", 32, 8, 96.0, 1.0, 0.9) for i in range(6)] + \
        [_group(f"ffn{i}", 384, 64, 96.0, 1.0, 0.99) for i in range(8)]
    full = _cost(groups, {g.name: g.full for g in groups})
    budget = keep * full
    ranks = allocate_uniform(groups, budget)
    spent = _cost(groups, ranks)
    assert spent <= budget + 1e-6
    # one fraction, rounded down or up: any two groups differ by less than one step of the coarser grid
    for g, h in itertools.combinations(groups, 2):
        step = max((g.grid[1] - g.grid[0]) / g.full, (h.grid[1] - h.grid[0]) / h.full)
        assert abs(ranks[g.name] / g.full - ranks[h.name] / h.full) <= step + 1e-9
    assert spent >= budget - 64 * 96.0  # within one FFN step of the budget (rounding alone: 3 to 6.5 steps short)


@pytest.mark.parametrize("seed", range(6))
def test_refinements_are_never_worse_and_keep_the_budget(seed):
    gen = torch.Generator().manual_seed(seed)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=gen))

    groups = [_group(f"g{i}", full, step, uniform(0.5, 20.0), uniform(0.01, 1.0), uniform(0.8, 0.999))
              for i, (full, step) in enumerate([(32, 8), (32, 8), (64, 8), (384, 64), (256, 64), (48, 12)])]
    full_cost = _cost(groups, {g.name: g.full for g in groups})
    for keep in (0.9, 0.7, 0.55, 0.4):
        budget = keep * full_cost
        descent = allocate_sis(groups, budget, refinement="none")
        refilled = allocate_sis(groups, budget, refinement="refill")
        exchanged = allocate_sis(groups, budget)
        for ranks in (descent, refilled, exchanged):
            assert _cost(groups, ranks) <= budget + 1e-6
            assert all(ranks[g.name] in g.grid for g in groups)
        assert _sis(groups, exchanged) <= _sis(groups, refilled) + 1e-12 <= _sis(groups, descent) + 2e-12


def test_exchange_reaches_the_best_allocation_that_descent_and_refill_miss():
    # Brute force over every allocation of a small problem. The descent cuts the wide group by a whole step of
    # 64 channels when a few narrow steps would have paid for the rest of the budget; the refill cannot undo it
    # (that step does not fit what is left), the exchange (raise it, pay with the narrow groups) does.
    groups = [_group("ffn", 256, 64, 4.0, 1.0, 0.99), _group("a", 16, 4, 1.0, 0.3, 0.8),
              _group("b", 16, 4, 1.0, 0.6, 0.85)]
    budget = 0.5 * _cost(groups, {g.name: g.full for g in groups})
    best = min((dict(zip([g.name for g in groups], combo)) for combo in itertools.product(*(g.grid for g in groups))
                if _cost(groups, dict(zip([g.name for g in groups], combo))) <= budget),
               key=lambda r: _sis(groups, r))
    descent, refilled = allocate_sis(groups, budget, refinement="none"), allocate_sis(groups, budget, refinement="refill")
    exchanged = allocate_sis(groups, budget)
    assert _cost(groups, exchanged) <= budget + 1e-9
    assert _sis(groups, exchanged) == pytest.approx(_sis(groups, best), rel=1e-12)
    assert _sis(groups, exchanged) < _sis(groups, refilled) - 0.05
    assert _sis(groups, refilled) <= _sis(groups, descent)


@pytest.mark.parametrize("refinement", ["refill", "exchange"])
def test_refinements_leave_fixed_groups_alone(refinement):
    groups = [_group("ffn", 384, 64, 10.0, 1.0, 0.99), _group("a", 32, 8, 1.0, 0.01, 0.9, fixed=8),
              _group("b", 32, 8, 1.0, 0.005, 0.9)]
    budget = 0.5 * _cost(groups, {g.name: g.full for g in groups})
    ranks = allocate_sis(groups, budget, refinement=refinement)
    assert ranks["a"] == 8
    assert _cost(groups, ranks) <= budget + 1e-9


def test_unknown_refinement_is_refused():
    with pytest.raises(ValueError, match="refinement"):
        allocate_sis([_group("a", 32, 8, 1.0, 1.0, 0.9)], 16.0, refinement="swap")


def test_auto_refinement_is_exchange_for_transformers_and_the_descent_for_unets():
    from slimdiff_diffusers.core.config import SlimConfig

    auto = SlimConfig(keep_ratio=0.6)
    assert auto.allocation_refinement == "auto"
    assert auto.allocation_refinement_for(["joint", "joint", "single"]) == "exchange"
    assert auto.allocation_refinement_for(["plain"]) == "none"
    assert auto.allocation_refinement_for([]) == "none"
    assert SlimConfig(keep_ratio=0.6, allocation_refinement="refill").allocation_refinement_for(["plain"]) == "refill"
    assert SlimConfig(keep_ratio=0.6, allocation_refinement="none").allocation_refinement_for(["joint"]) == "none"


def test_config_gives_front_ends_its_choices_defaults_and_wording():
    """SlimConfig owns an option's values, default and description (the CLI reads them, never copies them)."""
    from slimdiff_diffusers.core.config import ALLOCATION_REFINEMENTS, SlimConfig
    from slimdiff_diffusers.core.errors import ConfigError

    assert ALLOCATION_REFINEMENTS == ("auto", "exchange", "refill", "none")
    for value in ALLOCATION_REFINEMENTS:
        assert SlimConfig(keep_ratio=0.6, allocation_refinement=value).allocation_refinement == value
    with pytest.raises(ConfigError, match="allocation_refinement must be one of"):
        SlimConfig(keep_ratio=0.6, allocation_refinement="greedy")
    assert SlimConfig.option_default("allocation_refinement") == SlimConfig().allocation_refinement == "auto"
    assert SlimConfig.option_default("exclude") == [] and SlimConfig.option_default("targets") == ("qk", "vo", "ffn")
    text = SlimConfig.option_help("allocation_refinement")
    assert text.startswith('what the SIS allocation (allocation="sis") does after its greedy descent')
    assert '"auto" (the default) takes "exchange" for transformer denoisers' in text
    assert "``" not in text and "\n" not in text and text.endswith("have not been re-measured.")
    assert SlimConfig.option_help("keep_ratio").startswith("fraction of the compressible cost kept")
    with pytest.raises(ConfigError):
        SlimConfig.option_help("no_such_option")
    with pytest.raises(ConfigError):
        SlimConfig.option_default("no_such_option")
    # choices: the same tuple the validation accepts (what front ends offer as combos)
    assert SlimConfig.option_choices("allocation_refinement") is ALLOCATION_REFINEMENTS
    assert SlimConfig.option_choices("head_layout") == ("separate", "uniform")
    with pytest.raises(ConfigError, match="'keep_ratio' has no fixed set of choices"):
        SlimConfig.option_choices("keep_ratio")
    with pytest.raises(ConfigError, match="'no_such_option' is not a SlimConfig option"):
        SlimConfig.option_choices("no_such_option")
