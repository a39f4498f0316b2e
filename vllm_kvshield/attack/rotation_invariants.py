"""Within one request, K of one token at two positions: what the conjugated RoPE rotation gives away.

Under a per-request key a token's cached K at position p is k_p = y R(p) M (y: the token's
K before RoPE under the static transform, R(p): RoPE, M: the request's dense map). Equal
layer-0 V rows tell which rows hold one token (rowmatch, frequency), not where. Any
quadratic form G = M^-1 D M^-T, D constant on each rotary pair, gives the same value on
every row of a token: k_p G k_p^T = y D y^T. That is linear in G: each further row of a
repeated token gives one equation over the d(d+1)/2 entries of a symmetric G. Once the
equations pin the solution space down to those forms (d/2 of them, plus whatever the
slowest pairs, which barely rotate within a request, leave free), M is known up to a 2x2
map per pair, and the static mix-v family is left (pair permutation, c R(phi)).

This module counts that: the equations a request offers, and the dimension of their
(numerical) solution space, which must fall to about d/2 before the attack has M.

    groups = token_groups(v_head)                   # rows of equal layer-0 V, within the request
    found = invariant_forms(k_head, groups)         # singular values, null dimension, equations
"""

from dataclasses import dataclass

import torch

from .frequency import equal_groups

NULL_TOLERANCE = 1e-3  # singular value / largest under which a direction counts as solving the equations


def token_groups(v_head: torch.Tensor) -> list[list[int]]:
    """Rows [T, d] of one KV head's layer-0 V grouped by equality (one token each), groups of 2 or more."""
    return [g for g in equal_groups(v_head) if len(g) > 1]


def _sym_features(rows: torch.Tensor) -> torch.Tensor:
    """rows [N, d] -> [N, d(d+1)/2]: x G x^T = features(x) . upper(G), off-diagonals counted twice."""
    d = rows.shape[1]
    i, j = torch.triu_indices(d, d)
    scale = torch.where(i == j, 1.0, 2.0).to(rows.dtype)
    return rows[:, i] * rows[:, j] * scale


def equations(k_head: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[C, d(d+1)/2], one per repeated row: features(k_r) - features(k_first of its group), rows unit-normalised."""
    k = k_head.double()
    k = k / k.norm(dim=1, keepdim=True).mean()
    feats = _sym_features(k)
    out = [feats[g[1:]] - feats[g[0]] for g in groups]
    return torch.cat(out) if out else feats[:0]


@dataclass(frozen=True)
class InvariantForms:
    head_dim: int
    equations: int  # repeated rows: one equation each
    null_dimension: int  # directions with singular value <= NULL_TOLERANCE x largest (or no equation at all)
    singular_values: torch.Tensor  # [min(C, unknowns)], descending

    @property
    def unknowns(self) -> int:
        return self.head_dim * (self.head_dim + 1) // 2

    @property
    def determined(self) -> bool:
        """Whether the equations leave at most one pair-constant form per rotary pair (d/2 directions) free."""
        return self.null_dimension <= self.head_dim // 2


def invariant_forms(k_head: torch.Tensor, groups: list[list[int]], tolerance: float = NULL_TOLERANCE) -> InvariantForms:
    """The solution space of the equations of one KV head's K rows [T, d] and its equal-token groups."""
    a = equations(k_head, groups)
    d = k_head.shape[1]
    unknowns = d * (d + 1) // 2
    if len(a) == 0:
        return InvariantForms(d, 0, unknowns, torch.zeros(0, dtype=torch.float64))
    s = torch.linalg.svdvals(a)
    return InvariantForms(d, len(a), unknowns - int((s > tolerance * s[0]).sum()), s)
