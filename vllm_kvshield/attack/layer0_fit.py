"""Fit the layer-0 transform of each observed KV head from anchor rows (plain K/V known), per family.

The shield's design is public, so the attacker knows the families a mode can use:

    permutation      dims reordered (mode permute; the identity of plain vLLM is one)
    pair_similarity  rotary pairs reordered, each times c R(phi) (mix-v's K)
    linear           any d x d map (dense V, K of mix and of per-request keys)

Per part (K after RoPE, V) and observed head j: for every plain head h, fit the family on
head j's anchors and score it (relative squared residual; for linear, the leave-one-out
residual, which is uninformative only when anchors are fewer than the dims they span);
observed heads are matched to plain heads by least total score over K and V together (one
head permutation serves both). The most constrained family whose fit explains the anchors
(score <= TOLERANCE with enough anchors) is used; else linear (ridge).

    fits = fit_layer0(seen_k, plain_k, seen_v, plain_v)   # per observed head j: rows [n_j, d], plain [n_j, H, d]
    estimate = fits["v"].apply(j, rows)                    # observed rows of head j -> plain rows of head heads[j]
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .assignment import assign
from .known_plaintext import fit_pair_similarity, fit_permutation

TOLERANCE = 1e-3  # relative squared residual of an accepted constrained fit (bf16 rounding ~1e-5)
RIDGE = 1e-3  # ridge of the linear fit, relative to the mean diagonal of the seen Gram matrix
MIN_ANCHORS = {"permutation": 1, "pair_similarity": 2}
FAMILIES = {"k": ("permutation", "pair_similarity"), "v": ("permutation",)}  # tried before linear

Unmap = Callable[[torch.Tensor], torch.Tensor]  # seen [N, d] -> plain [N, d]


def _linear(seen: torch.Tensor, plain: torch.Tensor) -> tuple[float, Unmap]:
    """Ridge map seen -> plain and its leave-one-out relative squared residual (PRESS)."""
    s, p = seen.double(), plain.double()
    d = s.shape[1]
    gram = s.T @ s
    inv = torch.linalg.inv(gram + RIDGE * gram.diagonal().mean().clamp_min(1e-30) * torch.eye(d, dtype=s.dtype))
    w = inv @ s.T @ p
    leverage = ((s @ inv) * s).sum(1)
    held_out = (p - s @ w) / (1.0 - leverage).clamp_min(1e-3)[:, None]
    return float(held_out.pow(2).sum() / p.pow(2).sum().clamp_min(1e-30)), lambda x: (x.double() @ w).float()


def _fit(family: str, seen: torch.Tensor, plain: torch.Tensor) -> tuple[float, Unmap]:
    if family == "linear":
        return _linear(seen, plain)
    fit = (fit_permutation if family == "permutation" else fit_pair_similarity)(plain, seen)
    return fit.residual, fit.unmap


@dataclass
class HeadFit:
    """One part's fit: observed head j holds plain head heads[j], unmapped by unmaps[j]."""

    family: str
    heads: torch.Tensor  # [H]
    unmaps: list[Unmap]
    scores: torch.Tensor  # [H] score of each observed head's fit

    def apply(self, j: int, rows: torch.Tensor) -> torch.Tensor:
        return self.unmaps[j](rows)


def _candidates(part: str, seen: list[torch.Tensor], plain: list[torch.Tensor]) -> list[tuple[str, torch.Tensor, dict]]:
    """Per family: the [H_obs, H_plain] score matrix and the fitted unmaps."""
    h = len(seen)
    out = []
    for family in (*FAMILIES[part], "linear"):
        score = torch.full((h, h), float("inf"), dtype=torch.float64)
        maps = {}
        for j in range(h):
            if len(seen[j]) < MIN_ANCHORS.get(family, 2):
                continue
            for p in range(h):
                score[j, p], maps[j, p] = _fit(family, seen[j], plain[j][:, p])
        out.append((family, score, maps))
    return out


def _choose(candidates, match: torch.Tensor) -> HeadFit:
    """The most constrained family that explains every observed head's anchors under this head matching."""
    for family, score, maps in candidates:
        finite = torch.where(torch.isfinite(score), score, torch.tensor(1e6, dtype=score.dtype))
        chosen = finite[torch.arange(len(match)), match]
        if family == "linear" or bool((chosen <= TOLERANCE).all()):
            unmaps = [maps.get((j, int(match[j])), _zero) for j in range(len(match))]
            return HeadFit(family, match, unmaps, chosen.float())
    raise AssertionError("linear is always chosen last")


def fit_layer0(seen_k, plain_k, seen_v, plain_v, heads: torch.Tensor | None = None) -> dict[str, HeadFit]:
    """Fits of K and V. seen_*[j] [n_j, d]: anchor rows of observed head j; plain_*[j] [n_j, H, d]: their plain rows.

    One head matching for both parts (the design's one KV head permutation): the least total
    of each part's best family score, normalised; `heads` imposes one. A part without anchors is left out.
    """
    parts = {p: (s, q) for p, s, q in (("k", seen_k, plain_k), ("v", seen_v, plain_v)) if any(len(x) for x in s)}
    candidates = {p: _candidates(p, s, q) for p, (s, q) in parts.items()}
    if heads is None:
        total = 0
        for cands in candidates.values():
            best = torch.stack([torch.where(torch.isfinite(s), s, torch.tensor(1e6, dtype=s.dtype)) for _, s, _ in cands]).amin(0)
            total = total + best / best.mean().clamp_min(1e-30)
        heads = assign(total)
    return {p: _choose(cands, heads) for p, cands in candidates.items()}


def _zero(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(x)
