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

Layout: vLLM 0.32's CPU attention (ISA vec/vec16): per layer [blocks, H_kv, block_size, 2*d],
each (block, head) holding K dim-major (K[dim][slot]) then V slot-major (V[slot][dim]). Each
layer's moves are one gather and one scatter of whole rows on K and on V (indices per row, not per element).

    shuffle_step(kv_caches, starts=[0, 1, 2, 40], seq_lens=[70, 129, 38], block_table=bt, generator=g)
"""

import secrets

import torch

SHUFFLABLE_ISAS = ("vec", "vec16")


def fresh_generator(device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the OS CSPRNG (vLLM seeds torch's default one with a public seed)."""
    return torch.Generator(device).manual_seed(secrets.randbits(63))


def row_offsets(block_size: int, head_dim: int, device=None) -> torch.Tensor:
    """[bs, 2d] flat offsets, inside one (block, head), of each slot's K (dim-major) and V (slot-major) elements."""
    slot = torch.arange(block_size, device=device)[:, None]
    dim = torch.arange(head_dim, device=device)[None, :]
    return torch.cat((dim * block_size + slot, block_size * head_dim + slot * head_dim + dim), dim=1)


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


def shuffle_step(kv_caches: list[torch.Tensor], starts: list[int], seq_lens: list[int], block_table: torch.Tensor, generator) -> None:
    """Shuffle, in every layer's cache [blocks, H, bs, 2d], the rows one forward step wrote."""
    if not kv_caches:
        return
    blocks, heads, bs, two_d = kv_caches[0].shape
    swaps, permutes = plan_moves(starts, seq_lens, block_table, bs)
    if not swaps and not permutes:
        return
    d = two_d // 2
    slabs, dst, src = _moves(swaps, permutes, len(kv_caches), heads, generator, kv_caches[0].device)
    for layer, cache in enumerate(kv_caches):
        flat = cache.view(blocks * heads, bs * two_d)  # one (block, head) slab per row
        k = flat[:, : bs * d].view(-1, d, bs)  # K dim-major: k[slab, dim, slot]
        v = flat[:, bs * d :].view(-1, bs, d)  # V slot-major: v[slab, slot, dim]
        k_rows, v_rows = k[slabs, :, src[layer]], v[slabs, src[layer]]  # [P, d] each, gathered before any write
        k[slabs, :, dst[layer]] = k_rows
        v[slabs, dst[layer]] = v_rows
