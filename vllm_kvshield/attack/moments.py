"""Attack 3, scale-invariant moments for mode mix-v's K: centred log rotary-pair norms.

mix-v gives each K rotary pair a secret rotation and scale c (and permutes pairs and
heads). RoPE and the rotation keep the pair's norm, so the cached log pair norm is
the plain one plus log c, a constant per (head, slot). Subtracting the mean over the
request's positions removes log c; the plain side is centred with the mean under a
public token-frequency prior (never the secret prompt), then, once, with the mean of
the first round's guesses. Per head sorted, any head order (the permutations).

    guesses = CentredPairNorms(public, prior).recover(obs)   # obs must include layer 0
"""

import functools

import torch

from .features import log_pair_norms, nearest_any_head_order, sorted_values
from .observation import Observation
from .public_model import PublicModel

REFINEMENTS = 1  # re-centre the plain side on the guessed tokens this many times


class CentredPairNorms:
    """Nearest token by per-head sorted, centred log pair norms of layer-0 K."""

    name = "centred_pair_norms"

    def __init__(self, public: PublicModel, prior: torch.Tensor, refinements: int = REFINEMENTS):
        if prior.shape != (public.shape.vocab,):
            raise ValueError(f"prior has shape {tuple(prior.shape)}, expected ({public.shape.vocab},)")
        self.public = public
        self.prior = prior
        self.refinements = refinements

    @functools.cached_property
    def log_norms(self) -> torch.Tensor:
        return log_pair_norms(self.public.layer0_k)  # [V, H, d/2]; RoPE-free: pair norms ignore it

    def recover(self, obs: Observation) -> torch.Tensor:
        k, _ = obs.at(0)
        seen = log_pair_norms(k)  # [T, H, d/2]
        query = sorted_values(seen - seen.mean(dim=0))
        centre = torch.einsum("v,vhp->hp", self.prior, self.log_norms)
        guesses = nearest_any_head_order(query, sorted_values(self.log_norms - centre))
        for _ in range(self.refinements):
            centre = self.log_norms[guesses].mean(dim=0)
            guesses = nearest_any_head_order(query, sorted_values(self.log_norms - centre))
        return guesses
