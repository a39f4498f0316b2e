"""Attack 4, known plaintext: the first n tokens of the request reveal the layer's transform.

The attacker computes the plain layer-0 K (after RoPE, at the known positions) and V
of the n known tokens from the public weights, and fits, per observed head and per
candidate plain head, the transform families the shield's design allows (the design
is public, the key is not), most constrained first:

    permutation      dims reordered                                      (mode permute)
    pair similarity  rotary pairs reordered, each times c R(phi)         (mode mix-v's K)
    linear           any d x d map (ridge least squares)                 (dense V, mode mix's K)

A family is accepted when it has enough equations (n >= its minimum) and explains the
known tokens to within TOLERANCE (relative squared residual, far above bf16 rounding
and far below a chance fit). Heads are matched by least total residual. The fitted
inverse maps every other position back to plain K/V; the guess is the nearest
vocabulary token on the parts (K, V) whose fit was accepted.

    guesses = KnownPlaintext(public).recover(obs.with_known(tokens[:n]))
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .assignment import assign
from .features import nearest
from .observation import Observation
from .public_model import PublicModel

TOLERANCE = 1e-3  # relative squared residual of an accepted fit (bf16 rounding is ~1e-5)
RIDGE = 1e-4  # ridge of the linear fit, relative to the mean eigenvalue of the observed Gram matrix

Unmap = Callable[[torch.Tensor], torch.Tensor]  # observed [N, d] -> plain [N, d]


@dataclass
class Fit:
    residual: float  # relative squared residual on the known tokens
    unmap: Unmap


def fit_permutation(plain: torch.Tensor, seen: torch.Tensor) -> Fit:
    """seen ~ plain[:, perm]: perm by minimum-cost assignment of columns. plain, seen: [n, d]."""
    cost = torch.cdist(seen.T.double(), plain.T.double()).pow(2)  # [d_seen, d_plain]
    perm = assign(cost)  # seen column i is plain column perm[i]
    residual = (seen - plain[:, perm]).pow(2).sum() / seen.pow(2).sum().clamp_min(1e-30)
    inverse = torch.argsort(perm)
    return Fit(float(residual), lambda x: x[:, inverse])


def _complex_pairs(x: torch.Tensor) -> torch.Tensor:
    a, b = x.double().chunk(2, dim=-1)
    return torch.complex(a, b)  # [n, d/2]


def fit_pair_similarity(plain: torch.Tensor, seen: torch.Tensor) -> Fit:
    """Slot s of seen = w_s * pair p(s) of plain, as complex numbers (w = c e^{i phi}): p by assignment."""
    zp, zs = _complex_pairs(plain), _complex_pairs(seen)  # [n, P]
    cross = zp.conj().T @ zs  # [P_plain, P_seen]: sum_t conj(zp) zs
    power_p = zp.abs().pow(2).sum(0)  # [P_plain]
    power_s = zs.abs().pow(2).sum(0)  # [P_seen]
    residual = power_s[None] - cross.abs().pow(2) / power_p[:, None].clamp_min(1e-30)  # [P_plain, P_seen]
    pair = assign(residual.T)  # seen slot s holds plain pair pair[s]
    slots = torch.arange(len(pair))
    weight = cross[pair, slots] / power_p[pair].clamp_min(1e-30)  # [P_seen]
    total = residual[pair, slots].sum() / power_s.sum().clamp_min(1e-30)

    def unmap(x: torch.Tensor) -> torch.Tensor:
        z = _complex_pairs(x) / weight
        out = torch.zeros_like(z)
        out[:, pair] = z
        return torch.cat((out.real, out.imag), dim=-1).float()

    return Fit(float(total), unmap)


def fit_linear(plain: torch.Tensor, seen: torch.Tensor) -> Fit:
    """plain ~ seen W by ridge least squares; residual is 0 (uninformative) unless n > d."""
    s, p = seen.double(), plain.double()
    gram = s.T @ s
    ridge = RIDGE * gram.diagonal().mean().clamp_min(1e-30)
    w = torch.linalg.solve(gram + ridge * torch.eye(gram.shape[0], dtype=gram.dtype), s.T @ p)
    residual = (s @ w - p).pow(2).sum() / p.pow(2).sum().clamp_min(1e-30)
    return Fit(float(residual), lambda x: (x.double() @ w).float())


# family name, fitter, minimum known tokens for the fit to be evidence (d: the head dim)
FAMILIES: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor], Fit], Callable[[int], int]], ...] = (
    ("permutation", fit_permutation, lambda d: 1),
    ("pair_similarity", fit_pair_similarity, lambda d: 2),
    ("linear", fit_linear, lambda d: d + 1),
)


@dataclass
class PartFit:
    family: str
    accepted: bool
    residual: float
    heads: torch.Tensor  # [H] observed head j holds plain head heads[j]
    unmaps: list[Unmap]

    def apply(self, seen: torch.Tensor) -> torch.Tensor:
        """Observed [T, H, d] -> estimated plain [T, H, d]."""
        out = torch.empty_like(seen)
        for j, unmap in enumerate(self.unmaps):
            out[:, self.heads[j]] = unmap(seen[:, j])
        return out


def fit_part(plain: torch.Tensor, seen: torch.Tensor, tolerance: float = TOLERANCE) -> PartFit:
    """The most constrained family that explains the known rows: plain, seen [n, H, d]."""
    n, h, d = plain.shape
    fallback = None
    for family, fitter, minimum in FAMILIES:
        fits = [[fitter(plain[:, i], seen[:, j]) for i in range(h)] for j in range(h)]  # [seen j][plain i]
        cost = torch.tensor([[f.residual for f in row] for row in fits], dtype=torch.float64)
        heads = assign(cost)
        residual = float(cost[torch.arange(h), heads].mean())
        part = PartFit(family, False, residual, heads, [fits[j][int(heads[j])].unmap for j in range(h)])
        if n >= minimum(d) and residual <= tolerance:
            part.accepted = True
            return part
        fallback = part  # the last family (linear) if none is accepted
    return fallback


class KnownPlaintext:
    """Fits the layer-0 transform on the known tokens, undoes it, nearest vocabulary token."""

    name = "known_plaintext"

    def __init__(self, public: PublicModel, tolerance: float = TOLERANCE):
        self.public = public
        self.tolerance = tolerance
        self.last_fits: dict[str, PartFit] = {}  # per part, the fits of the last recover (for reports)

    def recover(self, obs: Observation) -> torch.Tensor:
        positions = obs.positions  # refuses a shuffled layout: this attack reads the first n rows as positions 0..n-1
        prefix = obs.known_prefix
        n = len(prefix)
        if not 0 < n < obs.length:
            raise ValueError(f"known-plaintext needs 0 < known tokens < {obs.length}, got {n}")
        known = torch.tensor(prefix)
        k, v = obs.at(0)
        plain_k = self.public.rotate(self.public.layer0_k[known], torch.arange(n))  # [n, H, d]
        plain_v = self.public.layer0_v[known]
        self.last_fits = {"k": fit_part(plain_k, k[:n], self.tolerance), "v": fit_part(plain_v, v[:n], self.tolerance)}
        use = [p for p, f in self.last_fits.items() if f.accepted] or ["k", "v"]
        features, tables = [], []
        for part in use:
            table = self.public.layer0_k if part == "k" else self.public.layer0_v  # [V, H, d]
            scale = table.pow(2).sum((1, 2)).mean().sqrt()  # weigh K and V alike
            estimate = self.last_fits[part].apply(k if part == "k" else v)
            if part == "k":
                estimate = self.public.unrotate(estimate, positions)
            features.append(estimate.flatten(1) / scale)
            tables.append(table.flatten(1) / scale)
        guesses = nearest(torch.cat(features, 1), torch.cat(tables, 1))
        guesses[:n] = known
        return guesses
