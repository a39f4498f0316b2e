"""Mode per-request: after each forward step, the rows it wrote move to uniformly random slots of their block.

Paged attention sums over a sequence's cached rows: every query after a row sees it, wherever
in the sequence's blocks it sits, so the order of rows inside a block does not matter once the
step that wrote them has run (a row's K and V move together; RoPE is already inside K). After
each step, per layer and KV head, with fresh randomness that is never stored:

    a block that got one new row (decode) at slot r: swap it with a uniform slot j <= r
        (inside-out Fisher-Yates: the block stays a uniformly random arrangement of its rows)
    a block that got several (a prefill chunk): a uniform permutation of all its filled slots

Blocks stay where they are, so the block table, prefix caching (a full block is read only by
queries after all of it) and preemption (recompute writes new blocks) are untouched. A row's
block still tells which block-size positions it came from; its slot tells nothing more.

Layout: vLLM 0.32's CPU cache is per layer [blocks, H_kv, block_size, 2*d], each (block, head) slab
holding its slots' K and V at offsets that depend on the attention ISA (kv_layout.row_offsets, read
off vLLM's own write op). Each layer's moves are one gather and one scatter of whole rows (K and V
of a slot together, element by element) through those offsets.

    shuffle_step(kv_caches, starts=[0, 1, 2, 40], seq_lens=[70, 129, 38], block_table=bt,
                 offsets=kv_layout.row_offsets("vec", 128, 64, torch.bfloat16), generator=g)
"""

import secrets

import torch


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
    for row in range(len(starts) - 1):
        q_len, seq_len = starts[row + 1] - starts[row], seq_lens[row]
        first = seq_len - q_len
        for index in range(first // block_size, (seq_len - 1) // block_size + 1) if q_len else ():
            block = int(block_table[row, index])
            filled = min(block_size, seq_len - index * block_size)
            new = filled - max(0, first - index * block_size)  # rows of this block this step wrote
            if new == 1 and filled > 1:
                swaps.append((block, filled - 1))
            elif new > 1:
                permutes.append((block, filled))
    return swaps, permutes


def _moves(swaps, permutes, layers: int, heads: int, generator, device):
    """Every row move of one step: (block, head) slab [P], destination and source slot [L, P] per layer.

    The moves of one (layer, block, head) permute a set of its slots, so gathering every source
    before scattering to every destination is exact.
    """
    head_ids = torch.arange(heads, device=device)
    slabs, dst, src = [], [], []
    if swaps:
        n = len(swaps)
        b = torch.tensor([blk for blk, _ in swaps], device=device)
        r = torch.tensor([slot for _, slot in swaps], device=device)[None, :, None].expand(layers, n, heads)
        j = (torch.rand(layers, n, heads, generator=generator, device=device) * (r + 1)).long()  # uniform in [0, r]
        slab = b[:, None] * heads + head_ids[None, :]  # [n, H]
        slabs.append(slab.repeat_interleave(2, dim=1).flatten())  # per block, per head: (new row -> j, row j -> r)
        dst.append(torch.stack((j, r), dim=-1).flatten(1))
        src.append(torch.stack((r, j), dim=-1).flatten(1))
    for block, filled in permutes:
        perm = torch.argsort(torch.rand(layers, heads, filled, generator=generator, device=device), dim=-1)  # [L, H, m]
        slabs.append((block * heads + head_ids).repeat_interleave(filled))
        dst.append(torch.arange(filled, device=device).repeat(heads).expand(layers, -1))
        src.append(perm.flatten(1))
    return torch.cat(slabs), torch.cat(dst, 1), torch.cat(src, 1)


def shuffle_step(kv_caches: list[torch.Tensor], starts: list[int], seq_lens: list[int], block_table: torch.Tensor,
                 offsets: torch.Tensor, generator) -> None:
    """Shuffle, in every layer's cache [blocks, H, bs, 2d], the rows one forward step wrote.

    offsets: [bs, 2d] where each slot's K and V sit inside a (block, head) slab (kv_layout.row_offsets).
    """
    if not kv_caches:
        return
    _, heads, bs, two_d = kv_caches[0].shape
    assert offsets.shape == (bs, two_d), f"offsets {tuple(offsets.shape)} for a cache of block size {bs}, 2d {two_d}"
    swaps, permutes = plan_moves(starts, seq_lens, block_table, bs)
    if not swaps and not permutes:
        return
    slabs, dst, src = _moves(swaps, permutes, len(kv_caches), heads, generator, kv_caches[0].device)
    offsets = offsets.to(kv_caches[0].device)
    base = (slabs * (bs * two_d))[None, :, None]  # [1, P, 1]: each move's (block, head) slab
    dst_index = (base + offsets[dst]).flatten(1)  # [L, P * 2d]: every element of each moved row
    src_index = (base + offsets[src]).flatten(1)
    for layer, cache in enumerate(kv_caches):
        flat = cache.view(-1)
        flat.index_copy_(0, dst_index[layer], flat.index_select(0, src_index[layer]))  # gathered before any write
