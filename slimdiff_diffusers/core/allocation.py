"""Spectral Influence Score and Automatic Rank Allocation (method.md §4).

Each group g (one QK, VO or FFN decomposition) has an exact relative error curve e_g(r), a cost that is
linear in its rank (parameters or multiply-accumulates: ``cost_g(r) = slope_g · r``) and an influence α_g.
The Spectral Influence Score of truncating g to rank r is ``SIS_g(r) = α_g · e_g(r)``; the allocator
minimises ``Σ_g SIS_g(r_g)`` subject to ``Σ_g cost_g(r_g) ≤ budget`` by greedy marginal analysis: it
repeatedly lowers, by one grid step, the group whose step removes cost at the smallest increase of SIS.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from .errors import BudgetError


@dataclass
class RankGroup:
    """One decomposed group as the allocator sees it."""

    name: str
    grid: list[int]  # allowed ranks, ascending; the last is the full rank
    slope: float  # cost per unit of rank
    errors: torch.Tensor  # relative error for ranks 0..full
    influence: float  # α_g
    fixed: int | None = None  # rank set by the user (rank_pattern)
    max_sparsity: float | None = None

    @property
    def full(self) -> int:
        return self.grid[-1]

    def cost(self, rank: int) -> float:
        return self.slope * rank

    def sis(self, rank: int) -> float:
        return self.influence * float(self.errors[rank])

    @property
    def floor_index(self) -> int:
        if self.max_sparsity is None:
            return 0
        min_rank = (1.0 - self.max_sparsity) * self.full
        return next(i for i, r in enumerate(self.grid) if r >= min_rank - 1e-9)


def rank_grid(full: int, step: int, floor: int) -> list[int]:
    """Multiples of ``step`` from ``floor`` (rounded up to the grid) to ``full``, always including ``full``."""
    step = max(1, min(step, full))
    floor = min(full, max(step, math.ceil(floor / step) * step))
    grid = list(range(floor, full, step))
    return [*grid, full]


def _total(groups: list[RankGroup], ranks: dict[str, int]) -> float:
    return sum(g.cost(ranks[g.name]) for g in groups)


def _floor_cost(groups: list[RankGroup]) -> float:
    return sum(g.cost(g.fixed if g.fixed is not None else g.grid[g.floor_index]) for g in groups)


def _check_reachable(groups: list[RankGroup], budget: float) -> None:
    floor = _floor_cost(groups)
    if floor > budget + 1e-6:
        full = sum(g.cost(g.full) for g in groups)
        raise BudgetError(
            f"the budget keeps {budget:,.0f} of {full:,.0f} but the rank floors alone keep {floor:,.0f} "
            f"(lowest reachable keep ratio {floor / full:.3f}). Raise the keep ratio, or lower min_rank / "
            "min_ffn_fraction / rank_multiple."
        )


def allocate_sis(groups: list[RankGroup], budget: float) -> dict[str, int]:
    """Greedy marginal-SIS allocation: the cheapest predicted damage per unit of cost removed goes first."""
    _check_reachable(groups, budget)
    index = {g.name: (len(g.grid) - 1) for g in groups}
    ranks = {g.name: (g.fixed if g.fixed is not None else g.full) for g in groups}
    total = _total(groups, ranks)
    heap: list[tuple[float, int, str]] = []
    by_name = {g.name: g for g in groups}

    def push(g: RankGroup) -> None:
        i = index[g.name]
        if g.fixed is not None or i <= g.floor_index:
            return
        cur, prev = g.grid[i], g.grid[i - 1]
        saved = g.cost(cur) - g.cost(prev)
        damage = g.sis(prev) - g.sis(cur)
        heapq.heappush(heap, (damage / max(saved, 1e-12), len(heap), g.name))

    for g in groups:
        push(g)
    while total > budget + 1e-6:
        if not heap:  # unreachable after _check_reachable, kept as a guard
            raise BudgetError("rank allocation could not meet the budget")
        _, _, name = heapq.heappop(heap)
        g = by_name[name]
        i = index[name]
        total -= g.cost(g.grid[i]) - g.cost(g.grid[i - 1])
        index[name] = i - 1
        ranks[name] = g.grid[i - 1]
        push(g)
    return ranks


def allocate_uniform(groups: list[RankGroup], budget: float) -> dict[str, int]:
    """The same kept fraction ``t`` in every free group (the largest ``t`` that fits the budget)."""
    _check_reachable(groups, budget)

    def ranks_at(t: float) -> dict[str, int]:
        out = {}
        for g in groups:
            if g.fixed is not None:
                out[g.name] = g.fixed
                continue
            allowed = g.grid[g.floor_index:]
            out[g.name] = min(allowed, key=lambda r: (abs(r - t * g.full), r))
        return out

    lo, hi = 0.0, 1.0
    if _total(groups, ranks_at(hi)) <= budget + 1e-6:
        return ranks_at(hi)
    for _ in range(60):
        mid = (lo + hi) / 2
        if _total(groups, ranks_at(mid)) <= budget + 1e-6:
            lo = mid
        else:
            hi = mid
    ranks = ranks_at(lo)
    if _total(groups, ranks) > budget + 1e-6:
        raise BudgetError("uniform allocation could not meet the budget on the rank grid")
    return ranks
