"""Spectral Influence Score and Automatic Rank Allocation (method.md §4).

Each group g (one QK, VO or FFN decomposition) has an exact relative error curve e_g(r), a cost that is
linear in its rank (parameters or multiply-accumulates: ``cost_g(r) = slope_g · r``) and an influence α_g.
The Spectral Influence Score of truncating g to rank r is ``SIS_g(r) = α_g · e_g(r)``; the allocator
minimises ``Σ_g SIS_g(r_g)`` subject to ``Σ_g cost_g(r_g) ≤ budget`` by greedy marginal analysis: it
repeatedly lowers, by one grid step, the group whose step removes cost at the smallest increase of SIS. The
descent stops at the first total within the budget, so on a coarse grid its last step can leave up to one whole
grid step of budget unused (an FFN step of 64 channels on a narrow model is percents of the budget) or cut a
wide group where narrow steps elsewhere would have cost less; a refill (raise groups back into what is left)
and a 1-exchange local search then correct it (``refinement``; method.md §4.2, decisions.md row 22).
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


REFINEMENTS = ("exchange", "refill", "none")


def allocate_sis(groups: list[RankGroup], budget: float, *, refinement: str = "exchange") -> dict[str, int]:
    """Greedy marginal-SIS allocation, then a refinement of what the descent's coarse last steps left behind.

    The descent lowers, one grid step at a time, the group with the cheapest predicted damage per unit of cost
    removed, until the total fits ``budget``. ``refinement`` (method.md §4.2, decisions.md row 22):

    * ``"none"``: the descent alone (the allocation before row 22);
    * ``"refill"``: then spend the budget the descent left unused, raising groups one step at a time, the largest
      SIS decrease per unit of cost first, among the steps that fit;
    * ``"exchange"`` (default): refill, then 1-exchange local search: raise one group by a step and pay for it
      with the descent (that group held) and a refill; keep the best such move while it lowers the total SIS.

    Each refinement only accepts moves that lower ``Σ SIS`` and keep the total within the budget, so its
    predicted objective is never worse than the step before it.
    """
    if refinement not in REFINEMENTS:
        raise ValueError(f"refinement must be one of {REFINEMENTS}, got {refinement!r}")
    _check_reachable(groups, budget)
    index = {g.name: (len(g.grid) - 1) for g in groups}
    ranks = {g.name: (g.fixed if g.fixed is not None else g.full) for g in groups}
    if not _descend(groups, ranks, index, budget):  # unreachable after _check_reachable, kept as a guard
        raise BudgetError("rank allocation could not meet the budget")
    if refinement != "none":
        _refill(groups, ranks, index, budget)
    if refinement == "exchange":
        _exchange(groups, ranks, index, budget)
    return ranks


def _descend(groups: list[RankGroup], ranks: dict[str, int], index: dict[str, int], budget: float,
             held: str | None = None) -> bool:
    """Lower groups (all but ``held``) one grid step at a time, the least SIS increase per unit of cost saved
    first, until the total fits ``budget``; in place. False if the floors stop it before."""
    total = _total(groups, ranks)
    heap: list[tuple[float, int, str]] = []
    by_name = {g.name: g for g in groups}

    def push(g: RankGroup) -> None:
        i = index[g.name]
        if g.fixed is not None or g.name == held or i <= g.floor_index:
            return
        cur, prev = g.grid[i], g.grid[i - 1]
        saved = g.cost(cur) - g.cost(prev)
        damage = g.sis(prev) - g.sis(cur)
        heapq.heappush(heap, (damage / max(saved, 1e-12), len(heap), g.name))

    for g in groups:
        push(g)
    while total > budget + 1e-6:
        if not heap:
            return False
        _, _, name = heapq.heappop(heap)
        g = by_name[name]
        i = index[name]
        total -= g.cost(g.grid[i]) - g.cost(g.grid[i - 1])
        index[name] = i - 1
        ranks[name] = g.grid[i - 1]
        push(g)
    return True


def _refill(groups: list[RankGroup], ranks: dict[str, int], index: dict[str, int], budget: float) -> None:
    """Spend what ``ranks`` leave of ``budget`` raising groups one grid step at a time, the largest SIS decrease
    per unit of cost first, among the steps that fit; in place. Every step lowers the predicted objective and
    keeps the total within the budget.

    After the descent it never undoes the descent's last step (that step saved more than is left, or the
    descent would have stopped one step earlier), so the two passes do not cycle."""
    left = budget - _total(groups, ranks)
    free = [g for g in groups if g.fixed is None]
    while True:
        best: tuple[float, RankGroup] | None = None
        for g in free:
            i = index[g.name]
            if i + 1 >= len(g.grid):
                continue
            added = g.cost(g.grid[i + 1]) - g.cost(g.grid[i])
            gain = g.sis(g.grid[i]) - g.sis(g.grid[i + 1])
            if added > left + 1e-6 or gain <= 0.0:
                continue
            ratio = gain / max(added, 1e-12)
            if best is None or ratio > best[0]:
                best = (ratio, g)
        if best is None:
            return
        g = best[1]
        i = index[g.name]
        left -= g.cost(g.grid[i + 1]) - g.cost(g.grid[i])
        index[g.name] = i + 1
        ranks[g.name] = g.grid[i + 1]


def _sis_total(groups: list[RankGroup], ranks: dict[str, int]) -> float:
    return sum(g.sis(ranks[g.name]) for g in groups)


def _exchange(groups: list[RankGroup], ranks: dict[str, int], index: dict[str, int], budget: float) -> None:
    """1-exchange local search, in place: for every group that can rise, raise it one step, pay with the descent
    over the other groups and refill what that leaves; take the move that lowers ``Σ SIS`` most, and repeat
    until none lowers it.

    The greedy descent is optimal for convex error curves on a fine grid; on a coarse grid its last steps can
    cut a wide group by a whole step when a few narrow steps elsewhere would have paid for less damage, and
    the refill alone cannot undo that (the wide step does not fit what is left). Each accepted move strictly
    lowers the objective, so the search ends; it is capped at one round per group as well."""
    free = [g for g in groups if g.fixed is None]
    current = _sis_total(groups, ranks)
    for _ in range(len(free)):
        best: tuple[float, dict[str, int], dict[str, int]] | None = None
        for g in free:
            if index[g.name] + 1 >= len(g.grid):
                continue
            trial_index, trial_ranks = dict(index), dict(ranks)
            trial_index[g.name] += 1
            trial_ranks[g.name] = g.grid[trial_index[g.name]]
            if not _descend(groups, trial_ranks, trial_index, budget, held=g.name):
                continue
            _refill(groups, trial_ranks, trial_index, budget)
            value = _sis_total(groups, trial_ranks)
            if value < current - 1e-12 * max(1.0, abs(current)) and (best is None or value < best[0]):
                best = (value, trial_index, trial_ranks)
        if best is None:
            return
        current, new_index, new_ranks = best
        index.update(new_index)
        ranks.update(new_ranks)


def allocate_uniform(groups: list[RankGroup], budget: float) -> dict[str, int]:
    """The same kept fraction ``t`` in every free group, as nearly as the rank grids allow, spending the budget.

    First the largest ``t`` whose rounding to each grid fits the budget; then, while a step fits what is left, the
    free group keeping the smallest fraction of its full rank is raised one grid step (cheapest first among
    equals), never above the grid rank just above ``t`` of its full rank: every group keeps ``t`` rounded down or
    up. On coarse grids the rounding alone can leave a sixth of the budget unspent (flux-tiny's 4-step head grids:
    keep 0.6 kept 0.50, decisions.md row 33).
    """
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
    return _fill_evenly(groups, ranks, budget, lo)


def _fill_evenly(groups: list[RankGroup], ranks: dict[str, int], budget: float, fraction: float) -> dict[str, int]:
    """Raise the free group of smallest kept fraction one grid step while a step fits the budget, each group up to
    the first grid rank at or above ``fraction`` of its full rank."""
    ranks = dict(ranks)
    left = budget - _total(groups, ranks)
    caps = {g.name: next(r for r in g.grid if r >= fraction * g.full - 1e-9) for g in groups}
    while True:
        steps = []
        for g in groups:
            if g.fixed is not None or ranks[g.name] >= caps[g.name]:
                continue
            nxt = next(r for r in g.grid if r > ranks[g.name])
            extra = g.cost(nxt) - g.cost(ranks[g.name])
            if extra <= left + 1e-6:
                steps.append((ranks[g.name] / g.full, extra, g.name, nxt))
        if not steps:
            return ranks
        _, extra, name, nxt = min(steps)
        ranks[name] = nxt
        left -= extra
