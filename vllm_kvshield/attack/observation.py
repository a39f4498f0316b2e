"""What a memory dump yields for one request, and what every attack returns.

    obs = Observation(layers=(0, 15), k=k, v=v)   # k, v [L, T, H_kv, d] read from vLLM's cache blocks
    guesses = attack.recover(obs)                   # [T] token ids, NO_GUESS where the attack gives up

The attacker also knows the public model and tokenizer, and, for the known-plaintext
attack, the first tokens of the request (`known`). Never the key, never the other tokens.
"""

from dataclasses import dataclass
from typing import Protocol

import torch

NO_GUESS = -1


@dataclass(frozen=True)
class Observation:
    """Cached K (after RoPE, as stored) and V of one request at some layers; positions are 0..T-1."""

    layers: tuple[int, ...]
    k: torch.Tensor  # [L, T, H_kv, d]
    v: torch.Tensor  # [L, T, H_kv, d]
    known: tuple[int, ...] = ()  # the request's first len(known) tokens, when the attacker knows them

    def __post_init__(self):
        if self.k.shape != self.v.shape or self.k.ndim != 4 or self.k.shape[0] != len(self.layers):
            raise ValueError(f"k {tuple(self.k.shape)} and v {tuple(self.v.shape)} must both be [L={len(self.layers)}, T, H_kv, d]")

    @property
    def length(self) -> int:
        return self.k.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        return torch.arange(self.length)

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, fp32, each [T, H_kv, d]."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not read; read layers: {self.layers}")
        i = self.layers.index(layer)
        return self.k[i].float(), self.v[i].float()

    def with_known(self, tokens: list[int] | tuple[int, ...]) -> "Observation":
        return Observation(self.layers, self.k, self.v, tuple(tokens))


class Attack(Protocol):
    """KV blocks in, token guesses out."""

    name: str

    def recover(self, obs: Observation) -> torch.Tensor:
        """Token guesses [T] (NO_GUESS where none)."""
        ...
