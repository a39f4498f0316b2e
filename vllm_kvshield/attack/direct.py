"""Attack 1, direct inversion: layer-0 K/V are functions of the token (and position) alone.

V of every vocabulary token, and K of every vocabulary token at the observed
position, follow from the public weights; the nearest one is the guess. Where the layout
shuffles rows, the attacker's best guess of a row's position is its slot (slot_positions). Rotating
every candidate to position m and comparing equals rotating the observed K back
to position 0 (RoPE is orthogonal), which is what is done.

    guesses = DirectInversion(public, part="k").recover(obs)   # obs must include layer 0
"""

import torch

from .features import nearest
from .observation import Observation, slot_positions
from .public_model import PublicModel

PARTS = ("k", "v")


class DirectInversion:
    """Nearest vocabulary token by layer-0 K (RoPE undone at the observed position) or V."""

    def __init__(self, public: PublicModel, part: str):
        if part not in PARTS:
            raise ValueError(f"part {part!r}; accepted: {', '.join(PARTS)}")
        self.public = public
        self.part = part
        self.name = f"direct_{part}"

    def recover(self, obs: Observation) -> torch.Tensor:
        k, v = obs.at(0)  # [T, H_kv, d]
        if self.part == "k":
            return nearest(self.public.unrotate(k, slot_positions(obs)).flatten(1), self.public.layer0_k.flatten(1))
        return nearest(v.flatten(1), self.public.layer0_v.flatten(1))
