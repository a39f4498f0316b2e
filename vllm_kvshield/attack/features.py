"""Features of K/V vectors and nearest-neighbour search over the vocabulary.

    g = nearest(query, table)                  # query [T, F], table [V, F] -> [T] indices (squared L2)
    g = nearest_any_head_order(query, table)   # [T, H, F] vs [V, H, F]: min over the order of the heads

Invariants that the shield's transforms do not change:
  - sorted values of a head: any permutation of its dims;
  - rotary pair norms |(k_i, k_{i+d/2})|: RoPE, and any per-pair rotation; sorted: any pair permutation;
  - head norms: any orthogonal map of a head.
"""

import itertools
import math

import torch

CHUNK = 4096  # vocabulary rows per distance block: [T, CHUNK] floats at a time
MAX_HEAD_ORDERS = 24  # beyond 4 heads, heads are put in order of their norm instead of trying every order


def pair_norms(x: torch.Tensor) -> torch.Tensor:
    """Norm of each neox rotary pair (i, i + d/2): [..., d] -> [..., d/2]."""
    a, b = x.chunk(2, dim=-1)
    return torch.sqrt(a * a + b * b)


def log_pair_norms(x: torch.Tensor, floor: float = 1e-6) -> torch.Tensor:
    return pair_norms(x).clamp_min(floor).log()


def sorted_values(x: torch.Tensor) -> torch.Tensor:
    return x.sort(dim=-1).values


def nearest(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the nearest table row (squared L2) for each query row: [T, F], [V, F] -> [T]."""
    return _argmin_distance([query], table)


def nearest_cosine(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the table row of highest cosine similarity: [T, F], [V, F] -> [T]."""
    q = query / query.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = table / table.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return nearest(q, t)


def head_orders(num_heads: int) -> list[list[int]]:
    if math.factorial(num_heads) > MAX_HEAD_ORDERS:
        return []
    return [list(p) for p in itertools.permutations(range(num_heads))]


def nearest_any_head_order(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Nearest table entry when the query's heads may come in any order: [T, H, F], [V, H, F] -> [T].

    Distance = min over head orders of the squared L2 between the reordered query and the entry.
    """
    orders = head_orders(query.shape[1])
    if not orders:  # too many heads to try every order: order both sides by head norm
        query = _by_head_norm(query)
        table = _by_head_norm(table)
        orders = [list(range(query.shape[1]))]
    return _argmin_distance([query[:, o].flatten(1) for o in orders], table.flatten(1))


def distances_any_head_order(query: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Squared L2 [T, B] between each query [T, H, F] and each table entry [B, H, F], min over head orders."""
    orders = head_orders(query.shape[1])
    if not orders:
        query, table, orders = _by_head_norm(query), _by_head_norm(table), [list(range(query.shape[1]))]
    flat = table.flatten(1)
    return torch.stack([torch.cdist(query[:, o].flatten(1), flat).pow(2) for o in orders]).amin(0)


def _by_head_norm(x: torch.Tensor) -> torch.Tensor:
    order = x.norm(dim=-1).argsort(dim=-1)  # [N, H]
    return torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))


def _argmin_distance(queries: list[torch.Tensor], table: torch.Tensor) -> torch.Tensor:
    """argmin over table rows of min over the query variants of the squared L2: variants [T, F] each."""
    t = queries[0].shape[0]
    best = torch.full((t,), float("inf"))
    best_idx = torch.zeros(t, dtype=torch.long)
    q_sq = [(q * q).sum(-1, keepdim=True) for q in queries]
    for start in range(0, table.shape[0], CHUNK):
        block = table[start : start + CHUNK]  # [C, F]
        b_sq = (block * block).sum(-1)[None]  # [1, C]
        dist = torch.stack([qs + b_sq - 2.0 * q @ block.T for q, qs in zip(queries, q_sq)]).amin(0)  # [T, C]
        val, idx = dist.min(dim=1)
        better = val < best
        best[better] = val[better]
        best_idx[better] = idx[better] + start
    return best_idx
