"""Where vLLM's CPU attention keeps each cached row: flat offsets inside one (block, KV head).

vLLM 0.32's CPU cache is, per layer, [blocks, H_kv, block_size, 2*d]: each (block, head) slab holds
that head's K (first half) and V (second half) of block_size slots, packed the way the attention
ISA's kernel reads them. `vec`/`vec16` keep K dim-major (K[dim][slot]) and V slot-major; `amx`
(bf16 on CPUs with AMX tiles) interleaves pairs of dims and of slots for its tiles. Rather than
restate each kernel's packing, the offsets are read off vLLM's own write op
(`cpu_attn_reshape_and_cache`): write every row's slot number, then its dim number, and see where
each lands. A slot's K and V elements sit at offsets[slot] whatever the ISA, so a row moves (the
row shuffle) or is read (the attack decoder) the same way on every layout.

    offsets = row_offsets("amx", block_size=128, head_dim=64, dtype=torch.bfloat16)  # [128, 128]
"""

import functools

import torch

ISAS = ("vec", "vec16", "amx")  # the layouts read and checked here; vLLM's others (neon, vxe, ...) are not run here
_DIGIT = 64  # integers below 64 are exact in bf16, fp16 and fp32


def _where_written(isa: str, block_size: int, head_dim: int, dtype: torch.dtype, value: torch.Tensor) -> torch.Tensor:
    """The flat slab [bs*2d] after vLLM writes K = V = value [bs, d] into slots 0..bs-1 of one block and head."""
    from vllm import _custom_ops as ops

    cache = torch.full((1, 1, block_size, 2 * head_dim), -1.0, dtype=dtype)
    key_cache, value_cache = cache.view(1, 1, 2 * block_size, head_dim).chunk(2, dim=2)
    x = value.to(dtype)[:, None, :].contiguous()  # [bs, 1 head, d]
    ops.cpu_attn_reshape_and_cache(x, x.clone(), key_cache, value_cache, torch.arange(block_size), isa)
    return cache.view(-1).float()


def _probe(isa: str, block_size: int, head_dim: int, dtype: torch.dtype, index: torch.Tensor, bound: int) -> torch.Tensor:
    """index [bs, d] (values < bound) as vLLM placed it: [bs*2d], written base _DIGIT one digit per write."""
    placed, scale = torch.zeros(2 * block_size * head_dim, dtype=torch.long), 1
    while scale < bound:
        placed += _where_written(isa, block_size, head_dim, dtype, (index // scale % _DIGIT).float()).long() * scale
        scale *= _DIGIT
    return placed


@functools.lru_cache(maxsize=None)
def row_offsets(isa: str, block_size: int, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """[bs, 2d] flat offsets inside one (block, head) slab: offsets[s, :d] of slot s's K, offsets[s, d:] of its V."""
    if isa not in ISAS:
        raise ValueError(f"kvshield: CPU attention ISA {isa!r} has a KV layout this plugin does not read; accepted: {', '.join(ISAS)}")
    slot = torch.arange(block_size)[:, None].expand(block_size, head_dim)
    dim = torch.arange(head_dim)[None, :].expand(block_size, head_dim)
    slots = _probe(isa, block_size, head_dim, dtype, slot, block_size)
    dims = _probe(isa, block_size, head_dim, dtype, dim, head_dim)
    half = block_size * head_dim
    offsets = torch.empty(block_size, 2 * head_dim, dtype=torch.long)
    for part, span in ((0, slice(0, half)), (1, slice(half, 2 * half))):  # K, then V
        s, j = slots[span], dims[span]
        assert s.min() >= 0 and j.min() >= 0, f"{isa}: part {part} of the slab was not written"
        cells = s * head_dim + j
        assert torch.equal(cells.sort().values, torch.arange(half)), f"{isa}: part {part} is not one cell per (slot, dim)"
        offsets.view(-1, 2, head_dim)[s, part, j] = torch.arange(half) + span.start
    return offsets


def cache_offsets(attention) -> torch.Tensor:
    """row_offsets of a vLLM attention layer's own cache [blocks, H_kv, bs, 2d] (its ISA is set by vLLM's CPU backend)."""
    cache = attention.kv_cache
    return row_offsets(getattr(attention, "isa", None), cache.shape[2], cache.shape[3] // 2, cache.dtype)
