"""Choosing one option per group under additive budgets, exactly: a multiple-choice knapsack
solved as a small integer program (scipy's HiGHS MILP), never by enumerating combinations.

Neighbourhood Distillation picks one candidate per neighbourhood minimising summed
reconstruction error under a parameter budget; architecture search adds more budgets.
"""
from __future__ import annotations

import numpy as np

from raykd.errors import RaykdError


def choose_one_per_group(costs: list[list[float]], sizes: list[list[list[float]]] = (),
                         budgets: list[float] = ()) -> list[int]:
    """Indices (one per group) minimising the summed cost subject to, for every budget b,
    sum over groups of sizes[b][group][choice] <= budgets[b]. Raises RaykdError if no choice
    fits."""
    if not budgets:   # no constraint couples the groups: the best of each
        return [int(np.argmin(c)) for c in costs]
    return best_choices(costs, sizes, budgets, 1)[0]


def best_choices(costs: list[list[float]], sizes: list[list[list[float]]] = (),
                 budgets: list[float] = (), k: int = 1) -> list[list[int]]:
    """The k best distinct choices (one index per group) under the budgets, best first: the
    integer program solved k times, each time excluding the choices found so far (a no-good
    cut: not all of a previous choice's picks again). Fewer than k when fewer fit; raises
    RaykdError when none does."""
    found: list[list[int]] = []
    for _ in range(k):
        picks = _solve(costs, sizes, budgets, found)
        if picks is None:
            break
        found.append(picks)
    if not found:
        raise RaykdError("no combination fits the budget")
    return found


def _solve(costs, sizes, budgets, exclude: list[list[int]]) -> list[int] | None:
    from scipy.optimize import Bounds, LinearConstraint, milp

    offsets = np.cumsum([0] + [len(c) for c in costs])
    n = int(offsets[-1])
    one_each = np.zeros((len(costs), n))
    for g in range(len(costs)):
        one_each[g, offsets[g]:offsets[g + 1]] = 1
    constraints = [LinearConstraint(one_each, 1, 1)]
    if budgets:
        limits = np.array([[v for group in size for v in group] for size in sizes], dtype=float)
        constraints.append(LinearConstraint(limits, -np.inf, np.array(budgets, dtype=float)))
    for picks in exclude:
        cut = np.zeros(n)
        cut[[offsets[g] + i for g, i in enumerate(picks)]] = 1
        constraints.append(LinearConstraint(cut, -np.inf, len(costs) - 1))
    result = milp(c=np.array([v for c in costs for v in c], dtype=float),
                  constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.x is None:
        return None
    x = np.round(result.x).astype(int)
    return [int(np.argmax(x[offsets[g]:offsets[g + 1]])) for g in range(len(costs))]
