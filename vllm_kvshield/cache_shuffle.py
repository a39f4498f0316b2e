"""Mode per-request: the rows a forward step wrote move to uniformly random slots of their block.

Paged attention sums over a sequence's cached rows: every query after a row sees it, wherever
in the sequence's blocks it sits, so the order of rows inside a block does not matter once the
layer's attention of the step that wrote them has run (a row's K and V move together; RoPE is
already inside K). Each step, per layer and KV head, with fresh randomness that is never stored:

    a block that got one new row (decode) at slot r: swap it with a uniform slot j <= r
        (inside-out Fisher-Yates: the block stays a uniformly random arrangement of its rows)
    a block that got several (a prefill chunk): a uniform permutation of all its filled slots

Blocks stay where they are, so the block table, prefix caching (a full block is read only by
queries after all of it) and preemption (recompute writes new blocks) are untouched. A row's
block still tells which block-size positions it came from; its slot tells nothing more.

Layout: vLLM 0.32's CPU cache is per layer [blocks, H_kv, block_size, 2*d], each (block, head) slab
holding its slots' K and V at offsets that depend on the attention ISA (kv_layout.row_offsets, read
off vLLM's own write op). Rows move whole (K and V of a slot together, element by element) through
those offsets, in place (kernels.swap_rows, kernels.move_rows). The moves of a step are drawn
before its forward; the model applies each layer's once that layer's attention has run (request_mix's
unmix op hands them on): on a thread beside the model when the worker has a spare core and the
step's matrices exceed the last-level cache (side_thread.py), else at once, while the blocks it just
read are still in the CPU's caches.

    moves = plan_step(starts=[0, 1, 2, 40], seq_lens=[70, 129, 38], block_table=bt, block_size=128,
                      heads=3, layers=30, generator=g)
    moves.apply(layer=0, cache=kv_caches[0], offsets=kv_layout.row_offsets("vec", 128, 64, torch.bfloat16).numpy())
    shuffle_step(kv_caches, starts, seq_lens, bt, offsets, g)    # the same for every layer at once
"""

import secrets

import numpy as np
import torch

from . import kernels


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS CSPRNG (vLLM seeds torch's default one with a public seed)."""
    return torch.Generator(device).manual_seed(secrets.randbits(63))


def plan_moves(starts: list[int], seq_lens: list[int], block_table: torch.Tensor, block_size: int):
    """The blocks one step wrote: (swaps, permutes), swaps as (block, slot of the one new row),
    permutes as (block, filled slots) for blocks that got several rows.

    starts: query_start_loc [rows + 1]; seq_lens: tokens of each row after the step;
    block_table: [rows, max_blocks]. Row r wrote positions [seq_len - q_len, seq_len).
    """
    swaps, permutes = [], []
    table = block_table[: len(starts) - 1].tolist()
    for row in range(len(starts) - 1):
        q_len, seq_len = starts[row + 1] - starts[row], seq_lens[row]
        first = seq_len - q_len
        for index in range(first // block_size, (seq_len - 1) // block_size + 1) if q_len else ():
            block = table[row][index]
            filled = min(block_size, seq_len - index * block_size)
            new = filled - max(0, first - index * block_size)  # rows of this block this step wrote
            if new == 1 and filled > 1:
                swaps.append((block, filled - 1))
            elif new > 1:
                permutes.append((block, filled))
    return swaps, permutes


def _swap_moves(swaps, layers: int, heads: int, generator):
    """Decode moves, one per (block, head) slab: slab [S], the new row's slot r [S], and per layer the
    slot j [L, S] it trades places with, uniform in [0, r] (j == r: it stays). numpy int64, built once per step."""
    blocks, slots = np.array(swaps, dtype=np.int64).T
    slab = (blocks[:, None] * heads + np.arange(heads)).ravel()  # [S = n * H]
    r = np.repeat(slots, heads)
    u = torch.rand(layers, r.shape[0], generator=generator, dtype=torch.float64).numpy()
    return slab, r, (u * (r + 1)).astype(np.int64)


def _permute_moves(permutes, layers: int, heads: int, generator):
    """Prefill moves: every filled slot of each (block, head) slab that got several rows, slab [P], takes
    the row of src [L, P] (a uniform permutation per layer and slab); dst [L, P] lists the slots in order."""
    head_ids = torch.arange(heads)
    slabs, dst, src = [], [], []
    for block, filled in permutes:
        perm = torch.argsort(torch.rand(layers, heads, filled, generator=generator), dim=-1)  # [L, H, m]
        slabs.append((block * heads + head_ids).repeat_interleave(filled))
        dst.append(torch.arange(filled).repeat(heads).expand(layers, -1))
        src.append(perm.flatten(1))
    return torch.cat(slabs), torch.cat(dst, 1), torch.cat(src, 1)


class StepMoves:
    """One step's row moves in each of a worker's layers (by position 0..L-1), applied one layer at a time."""

    def __init__(self, swaps, permutes, layers: int, heads: int, generator):
        self.pending = set(range(layers))  # layers not yet shuffled
        self.swaps = self.permutes = None
        self._bases = None  # (swaps', permutes') slab element offsets, at the first apply
        if swaps:
            self.swaps = _swap_moves(swaps, layers, heads, generator)
        if permutes:
            slabs, dst, src = _permute_moves(permutes, layers, heads, generator)
            self.permutes = slabs.numpy(), dst.numpy(), src.numpy()

    def apply(self, layer: int, cache: torch.Tensor, offsets: np.ndarray) -> None:
        """Move this step's rows in one layer's cache [blocks, H, bs, 2d] (CPU). offsets: [bs, 2d] (kv_layout, as numpy)."""
        _, heads, bs, two_d = cache.shape
        assert offsets.shape == (bs, two_d), f"offsets {offsets.shape} for a cache of block size {bs}, 2d {two_d}"
        assert layer in self.pending, f"layer {layer} shuffled twice or unknown (pending {sorted(self.pending)})"
        if self._bases is None:  # element offset of each slab: the same in every layer
            self._bases = tuple(None if m is None else m[0] * (bs * two_d) for m in (self.swaps, self.permutes))
        swap_base, permute_base = self._bases
        if self.swaps is not None:  # a block got one row or several: the two kinds touch different slabs
            _, r, j = self.swaps
            kernels.swap_rows(cache, swap_base, r, j[layer], offsets)
        if self.permutes is not None:
            _, dst, src = self.permutes
            kernels.move_rows(cache, permute_base, dst[layer], src[layer], offsets)  # gathered before any write
        self.pending.discard(layer)


def plan_step(starts: list[int], seq_lens: list[int], block_table: torch.Tensor, block_size: int, heads: int,
              layers: int, generator) -> StepMoves | None:
    """The moves of one step in every layer (fresh randomness from generator); None if it wrote no block."""
    swaps, permutes = plan_moves(starts, seq_lens, block_table, block_size)
    if not swaps and not permutes:
        return None
    return StepMoves(swaps, permutes, layers, heads, generator)


def shuffle_step(kv_caches: list[torch.Tensor], starts: list[int], seq_lens: list[int], block_table: torch.Tensor,
                 offsets: torch.Tensor, generator) -> None:
    """Shuffle, in every layer's cache [blocks, H, bs, 2d] (CPU), the rows one forward step wrote."""
    if not kv_caches:
        return
    _, heads, bs, _ = kv_caches[0].shape
    moves = plan_step(starts, seq_lens, block_table, bs, heads, len(kv_caches), generator)
    if moves is None:
        return
    offsets = offsets.numpy()
    for layer, cache in enumerate(kv_caches):
        moves.apply(layer, cache, offsets)
