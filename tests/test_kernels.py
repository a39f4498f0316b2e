"""kernels.py against torch: the per-request decode path's row products and the row shuffle's moves."""

import sys

import numpy as np
import pytest
import torch

from vllm_kvshield import cache_shuffle, kernels


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("d", [6, 64, 128])
def test_row_matmul_bf16_is_the_fp32_product_rounded_once(rows, d):
    g = torch.Generator().manual_seed(d + rows)
    x = torch.randn(5, rows, d, generator=g).to(torch.bfloat16)
    m = torch.randn(5, d, d, generator=g).to(torch.bfloat16)
    want = torch.matmul(x.double(), m.double()).float().to(torch.bfloat16)  # exact sums, then one rounding
    got = kernels.row_matmul(x, m)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    # fp32 sums in another order than fp64's may land one bf16 step away, never more
    step = torch.finfo(torch.bfloat16).eps * want.float().abs().clamp_min(1e-30)
    assert ((got.float() - want.float()).abs() <= step).all()
    assert (got == want).float().mean() > 0.95


def test_row_matmul_fp32_and_strided_input():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 3, 80, generator=g)
    x = wide[..., :64]  # not contiguous
    m = torch.randn(4, 64, 64, generator=g)
    torch.testing.assert_close(kernels.row_matmul(x, m), torch.matmul(x, m), rtol=1e-5, atol=1e-5)


def test_row_matmul_falls_back_to_torch_for_other_dtypes():
    x, m = torch.randn(2, 3, 8).half(), torch.randn(2, 8, 8).half()
    assert torch.equal(kernels.row_matmul(x, m), torch.matmul(x, m))


def test_bf16_rounding_matches_torchs_cast():
    g = torch.Generator().manual_seed(1)
    values = torch.cat((
        torch.randn(2000, generator=g) * 10.0 ** torch.randint(-30, 30, (2000,), generator=g),
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 3.0e38, -3.0e38, 1e-40]),
        (torch.randint(0, 0x7F80, (500,), generator=g).int() << 16 | 0x8000).view(torch.float32),  # exact ties, finite
    ))
    got = torch.tensor([int(kernels._f32_to_bf16(np.float32(v))) for v in values.tolist()], dtype=torch.int16)
    assert torch.equal(got.view(torch.bfloat16), values.to(torch.bfloat16))
    nans = [kernels._f32_to_bf16(np.float32(v)) for v in (float("nan"), np.frombuffer(np.uint32(0x7FFFFFFF).tobytes(), np.float32)[0])]
    assert torch.tensor([int(n) for n in nans], dtype=torch.int16).view(torch.bfloat16).isnan().all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swap_and_move_rows_follow_the_offsets(dtype):
    bs, d, slabs = 8, 4, 3
    offsets = torch.randperm(2 * bs * d, generator=torch.Generator().manual_seed(2)).view(bs, 2 * d)
    cache = torch.arange(slabs * bs * 2 * d).to(dtype)  # distinct values (exact in bf16 below 256)
    want = cache.clone().view(slabs, -1)
    base = np.array([0, 2 * bs * 2 * d], np.int64)  # slabs 0 and 2
    a, b = np.array([1, 5], np.int64), np.array([6, 5], np.int64)  # slab 2: a row with itself, no move
    kernels.swap_rows(cache, base, a, b, offsets.numpy())
    want[0, offsets[1]], want[0, offsets[6]] = want[0, offsets[6]].clone(), want[0, offsets[1]].clone()
    assert torch.equal(cache.view(slabs, -1), want)
    # a 3-cycle in slab 1: every source read before any write
    base, dst, src = np.full(3, bs * 2 * d, np.int64), np.array([0, 1, 2], np.int64), np.array([2, 0, 1], np.int64)
    kernels.move_rows(cache, base, dst, src, offsets.numpy())
    want[1, offsets[[0, 1, 2]]] = want[1, offsets[[2, 0, 1]]].clone()
    assert torch.equal(cache.view(slabs, -1), want)


def test_touch_reads_one_word_of_every_line_and_writes_nothing():
    t = torch.randn(5, 3, 64, 64).to(torch.bfloat16)  # one batch row's matrices of one part
    kept = t.clone()
    assert kernels.touch(t) == int(t.view(-1).view(torch.int64)[::8].sum())
    assert torch.equal(t.view(torch.int16), kept.view(torch.int16))


def test_step_moves_apply_once_per_layer():
    bs, d, heads, layers = 8, 4, 2, 3
    moves = cache_shuffle.plan_step([0, 1], [6], torch.tensor([[0]]), bs, heads, layers, cache_shuffle.fresh_generator())
    offsets = np.arange(bs * 2 * d).reshape(bs, 2 * d)
    cache = torch.zeros(1, heads, bs, 2 * d)
    for layer in range(layers):
        moves.apply(layer, cache, offsets)
    assert not moves.pending
    with pytest.raises(AssertionError, match="shuffled twice"):
        moves.apply(0, cache, offsets)
    assert cache_shuffle.plan_step([0, 1], [1], torch.tensor([[0]]), bs, heads, layers, cache_shuffle.fresh_generator()) is None


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16 if t.dtype == torch.bfloat16 else torch.int32).numpy()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("g", [1, 2, 3, 4, 5, 7])
def test_vector_products_equal_the_scalar_loops_bit_for_bit(dtype, g):
    """Head size 64: row_matmul runs the vector code; _row_matmul is the scalar loops."""
    gen = torch.Generator().manual_seed(g)
    x = torch.randn(6, g, 64, generator=gen).to(dtype)
    m = torch.randn(6, 64, 64, generator=gen).to(dtype)
    x[1, 0, 3], x[2, g - 1, 5], m[3, 7, 9] = float("nan"), float("inf"), float("-inf")
    x[4] *= 1e-39  # denormal inputs
    m[5] *= 3e36  # sums that overflow
    vector, scalar = kernels.row_matmul(x, m), torch.empty_like(x)
    kernels._row_matmul(*(kernels._array(t, False) for t in (x, m, scalar)))
    assert np.array_equal(_bits(vector), _bits(scalar)), "the vector code and the loops disagree"
    assert vector.isnan().any() and vector.isinf().any()  # the specials reached the output


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 64])
@pytest.mark.parametrize("split", [False, True])
def test_mix_qkv_uses_row_bs_matrices(dtype, d, split):
    """A decode step of n rows on a layer's [4, R, H, d, d] with R > n: row b's M^{-T}, M, A on q, k, v (d 64: the
    vector code; split: q, k, v are views into one qkv row, as vLLM's attention forward passes them)."""
    n, rows, heads, g = 3, 5, 2, 3
    gen = torch.Generator().manual_seed(3)
    mats = torch.randn(4, rows, heads, d, d, generator=gen).to(dtype)
    if split:
        qkv = torch.randn(n, (g + 2) * heads * d, generator=gen).to(dtype)
        q, k, v = (t.view(n, heads, -1, d) for t in qkv.split([g * heads * d, heads * d, heads * d], dim=-1))
    else:
        q, k, v = (torch.randn(n, heads, r, d, generator=gen).to(dtype) for r in (g, 1, 1))
    q2, k2, v2 = kernels.mix_qkv(q, k, v, mats)
    for got, x, part in ((q2, q, 1), (k2, k, 0), (v2, v, 2)):
        want = torch.matmul(x.double(), mats[part, :n].double())
        torch.testing.assert_close(got.double(), want, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d", [8, 64])
def test_tokens_take_the_matrices_of_their_row_and_padding_comes_out_zero(dtype, d):
    """A mixed step: tokens 0-2 one request's prefill chunk (row 2), token 3 a decode of row 0, token 4 of row 4, then
    two padding tokens. mix_qkv and rows_matmul (the unmix) use row rows[t] for token t; the padding is zero."""
    heads, g, rows = 2, 3, np.array([2, 2, 2, 0, 4])
    n = len(rows) + 2
    gen = torch.Generator().manual_seed(5)
    mats = torch.randn(4, 5, heads, d, d, generator=gen).to(dtype)
    qkv = torch.randn(n, (g + 2) * heads * d, generator=gen).to(dtype)
    q, k, v = (t.view(n, heads, -1, d) for t in qkv.split([g * heads * d, heads * d, heads * d], dim=-1))
    outs = (*kernels.mix_qkv(q, k, v, mats, rows), kernels.rows_matmul(q, mats[3], rows))
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    for got, x, part in zip(outs, (q, k, v, q), (1, 0, 2, 3)):
        want = torch.matmul(x[: len(rows)].double(), mats[part, torch.from_numpy(rows)].double())
        torch.testing.assert_close(got[: len(rows)].double(), want, **tol)
        assert got.shape == x.shape and not got[len(rows) :].any(), "padding tokens must come out zero"


def test_vllm_still_rebinds_its_kernels_once_numba_is_loaded():
    """The next engine in a process that ran mode per-request starts: vLLM's kernel rebinding scans
    vars() of every module global, llvmlite's library wrapper among them (patches/llvmlite_vars.py)."""
    from vllm.triton_utils import dispatcher

    assert "llvmlite.binding.ffi" in sys.modules  # loaded with kernels
    dispatcher._rebind_kernels([])
