"""What a memory dump yields for one request, what the attacker knows of its layout, and what attacks return.

    layout = Layout(block_size=128)                          # plain vLLM: slot = position, one key per server
    obs = Observation(layers=(0, 15), k=k, v=v, layout=layout)   # k, v [L, T, H_kv, d] read from the cache blocks
    guesses = attack.recover(obs)                            # [T] token ids per position, NO_GUESS where none

The attacker knows the public model and tokenizer, the shield's design (hence the layout)
and the block table; attacks that know some plaintext get it as `known`: (position, token)
pairs (e.g. the chat template's tokens). Never the key, never the other tokens.

Rows are stored block by block (the block table's order). In an ordered layout (every
static mode) row i is position i for every KV head. In a shuffled layout (per-request
keys) the rows a block holds are its positions in an order drawn per (layer, KV head) and
never stored: only the block of a row is known, and row i of one head need not be row i
of another. Attacks must then place rows themselves (`positions` refuses).
"""

from dataclasses import dataclass, replace
from typing import Protocol

import torch

NO_GUESS = -1


@dataclass(frozen=True)
class Layout:
    """What the block table and the public design tell about where a request's rows sit."""

    block_size: int
    ordered: bool = True  # a row's slot in its block is its position, the same row for every KV head
    shared_key: bool = True  # every request of the server is under the same transform

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")

    def blocks(self, length: int) -> list[range]:
        """The positions (= rows) each block holds, in block-table order."""
        return [range(b, min(b + self.block_size, length)) for b in range(0, length, self.block_size)]


@dataclass(frozen=True)
class Observation:
    """Cached K (after RoPE, as stored) and V of one request at some layers."""

    layers: tuple[int, ...]
    k: torch.Tensor  # [L, T, H_kv, d]
    v: torch.Tensor  # [L, T, H_kv, d]
    layout: Layout = Layout(block_size=1 << 30)
    known: tuple[tuple[int, int], ...] = ()  # (position, token) pairs the attacker knows

    def __post_init__(self):
        if self.k.shape != self.v.shape or self.k.ndim != 4 or self.k.shape[0] != len(self.layers):
            raise ValueError(f"k {tuple(self.k.shape)} and v {tuple(self.v.shape)} must both be [L={len(self.layers)}, T, H_kv, d]")

    @property
    def length(self) -> int:
        return self.k.shape[1]

    @property
    def positions(self) -> torch.Tensor:
        """Position of each row; only where the layout says the slot is the position."""
        if not self.layout.ordered:
            raise ValueError("rows are shuffled inside their blocks in this layout: a row's position is unknown")
        return torch.arange(self.length)

    @property
    def known_prefix(self) -> list[int]:
        """The known tokens at positions 0, 1, ... up to the first unknown position."""
        known = dict(self.known)
        prefix = []
        while len(prefix) in known:
            prefix.append(known[len(prefix)])
        return prefix

    def at(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer, fp32, each [T, H_kv, d]."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not read; read layers: {self.layers}")
        i = self.layers.index(layer)
        return self.k[i].float(), self.v[i].float()

    def with_known(self, tokens: list[int] | tuple[int, ...]) -> "Observation":
        """The first len(tokens) tokens known."""
        return replace(self, known=tuple(enumerate(tokens)))

    def with_anchors(self, pairs) -> "Observation":
        """(position, token) pairs known."""
        return replace(self, known=tuple((int(p), int(t)) for p, t in pairs))


def slot_positions(obs: Observation) -> torch.Tensor:
    """Each row's position where the layout says it (ordered), else the attacker's only guess: its slot.

    For attacks that decode row by row and have nothing to place rows with; scoring is per
    position, so under a shuffled layout they score what chance placement gives.
    """
    return obs.positions if obs.layout.ordered else torch.arange(obs.length)


class Attack(Protocol):
    """KV blocks in, token guesses out."""

    name: str

    def recover(self, obs: Observation) -> torch.Tensor:
        """Token guesses per position [T] (NO_GUESS where none)."""
        ...
