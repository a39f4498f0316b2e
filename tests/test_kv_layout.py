"""kv_layout reads where vLLM's own CPU cache-write op puts each row, per attention ISA; the attack
decoder reads back exactly what that op wrote. vLLM picks `amx` for bf16 on CPUs with AMX tiles
(this suite's engines then run on it), `vec`/`vec16` elsewhere."""

import pytest
import torch
from vllm import _custom_ops as ops

from vllm_kvshield import kv_layout
from vllm_kvshield.attack import kvcache
from test_per_request_parts import vec_offsets  # the packing the shuffle tests assume for vec

AMX = torch.cpu._is_amx_tile_supported()
# (isa, head_dim, dtype): vec16 is vLLM's choice when head_dim is a multiple of 16 but not of 32
CASES = [("vec", 64, torch.float32), ("vec", 64, torch.bfloat16), ("vec16", 48, torch.bfloat16), ("amx", 64, torch.bfloat16)]


def needs(isa):
    if isa == "amx" and not AMX:
        pytest.skip("this CPU has no AMX tiles: vLLM never picks the amx layout here")


@pytest.mark.parametrize("isa,d,dtype", CASES)
def test_offsets_are_one_cell_per_slot_and_dim(isa, d, dtype):
    needs(isa)
    bs = 128
    offsets = kv_layout.row_offsets(isa, bs, d, dtype)
    assert offsets.shape == (bs, 2 * d)
    assert torch.equal(offsets.flatten().sort().values, torch.arange(2 * bs * d))
    assert offsets[:, :d].max() < bs * d <= offsets[:, d:].min(), "K must fill the slab's first half, V its second"
    if isa in ("vec", "vec16"):
        assert torch.equal(offsets, vec_offsets(bs, d)), "vec packs K dim-major and V slot-major"
    else:
        assert not torch.equal(offsets, vec_offsets(bs, d)), "amx packs for its tiles, not as vec"


@pytest.mark.parametrize("isa,d,dtype", CASES)
def test_decoder_reads_what_vllm_wrote(isa, d, dtype):
    """Rows written by vLLM's cpu_attn_reshape_and_cache into scattered blocks come back in position order."""
    needs(isa)
    blocks, heads, bs, seq_len = 6, 3, 32, 70
    torch.manual_seed(0)
    k, v = torch.randn(seq_len, heads, d).to(dtype), torch.randn(seq_len, heads, d).to(dtype)  # [T, H_kv, d]
    cache = torch.zeros(blocks, heads, bs, 2 * d, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * bs, d).chunk(2, dim=2)
    table = torch.tensor([4, 1, 5])
    slots = table[torch.arange(seq_len) // bs] * bs + torch.arange(seq_len) % bs
    ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, isa)
    got_k, got_v = kvcache.decode_blocks(cache, table, seq_len, kv_layout.row_offsets(isa, bs, d, dtype))
    assert torch.equal(got_k, k) and torch.equal(got_v, v)


def test_an_unknown_isa_is_named_with_the_accepted_ones():
    with pytest.raises(ValueError, match=r"'neon'.*accepted: vec, vec16, amx"):
        kv_layout.row_offsets("neon", 128, 64, torch.bfloat16)
