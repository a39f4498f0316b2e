"""Attack 2, permutation-invariant features: what reordering heads, pairs and dims cannot hide.

V: each head's sorted values. K: each head's sorted rotary-pair norms (RoPE keeps
every pair's norm, so they do not depend on the position either). Heads may come
in any order: the distance is the minimum over head orders. Head norms are implied
(the norm of the sorted values / pair norms).

    guesses = PermutationInvariant(public, part="v").recover(obs)   # obs must include layer 0
"""

import functools

import torch

from .features import nearest_any_head_order, pair_norms, sorted_values
from .observation import Observation
from .public_model import PublicModel

PARTS = ("k", "v")


def invariant_feature(x: torch.Tensor, part: str) -> torch.Tensor:
    """[..., H, d] -> per head: sorted pair norms (part "k", [..., H, d/2]) or sorted values ("v", [..., H, d])."""
    return sorted_values(pair_norms(x)) if part == "k" else sorted_values(x)


class PermutationInvariant:
    """Nearest vocabulary token by per-head sorted features, any head order."""

    def __init__(self, public: PublicModel, part: str):
        if part not in PARTS:
            raise ValueError(f"part {part!r}; accepted: {', '.join(PARTS)}")
        self.public = public
        self.part = part
        self.name = f"invariant_{part}"

    @functools.cached_property
    def table(self) -> torch.Tensor:
        plain = self.public.layer0_k if self.part == "k" else self.public.layer0_v
        return invariant_feature(plain, self.part)  # [V, H, F]

    def recover(self, obs: Observation) -> torch.Tensor:
        k, v = obs.at(0)
        return nearest_any_head_order(invariant_feature(k if self.part == "k" else v, self.part), self.table)
