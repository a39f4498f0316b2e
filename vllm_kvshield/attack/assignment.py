"""Minimum-cost assignment (the linear assignment problem), without scipy.

    col = assign(cost)        # cost [n, n]; row i is matched to column col[i]; sum cost[i, col[i]] is minimal

Shortest augmenting paths with potentials (Jonker-Volgenant / Kuhn-Munkres), O(n^3),
the inner scan vectorised over columns: a 64 x 64 problem takes a few milliseconds.
"""

import numpy as np
import torch


def assign(cost: torch.Tensor) -> torch.Tensor:
    """The permutation col [n] minimising sum_i cost[i, col[i]] for a square cost [n, n]."""
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be square, got shape {tuple(cost.shape)}")
    c = cost.detach().double().cpu().numpy()
    n = c.shape[0]
    u = np.zeros(n + 1)  # row potentials (1-based, 0 is the virtual root)
    v = np.zeros(n + 1)  # column potentials
    row_of = np.zeros(n + 1, dtype=np.int64)  # row_of[j]: row assigned to column j (0: free)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        row_of[0] = i
        j0 = 0
        min_slack = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[j0] = True
            i0 = row_of[j0]
            free = ~used
            free[0] = False
            slack = c[i0 - 1] - u[i0] - v[1:]  # [n] reduced costs from row i0
            better = free[1:] & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = j0
            masked = np.where(free[1:], min_slack[1:], np.inf)
            j1 = int(np.argmin(masked)) + 1
            delta = masked[j1 - 1]
            u[row_of[used]] += delta
            v[used] -= delta
            min_slack[~used] -= delta
            j0 = j1
            if row_of[j0] == 0:
                break
        while j0:
            j1 = way[j0]
            row_of[j0] = row_of[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[row_of[1:] - 1] = np.arange(n)
    return torch.from_numpy(col)
