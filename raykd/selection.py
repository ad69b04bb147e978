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
    from scipy.optimize import Bounds, LinearConstraint, milp

    offsets = np.cumsum([0] + [len(c) for c in costs])
    n = int(offsets[-1])
    one_each = np.zeros((len(costs), n))
    for g in range(len(costs)):
        one_each[g, offsets[g]:offsets[g + 1]] = 1
    limits = np.array([[v for group in size for v in group] for size in sizes], dtype=float)
    result = milp(
        c=np.array([v for c in costs for v in c], dtype=float),
        constraints=[LinearConstraint(one_each, 1, 1),
                     LinearConstraint(limits, -np.inf, np.array(budgets, dtype=float))],
        integrality=np.ones(n), bounds=Bounds(0, 1))
    if result.x is None:
        raise RaykdError("no combination fits the budget")
    x = np.round(result.x).astype(int)
    return [int(np.argmax(x[offsets[g]:offsets[g + 1]])) for g in range(len(costs))]
