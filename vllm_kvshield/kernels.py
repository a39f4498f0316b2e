"""CPU loops of mode per-request's decode path, compiled with numba (which vLLM's CPU build already needs).

Per decode step a worker multiplies each request's q, k, v and attention output by that
request's own d x d matrices: 4 L H_kv B small products (11,520 at batch 32 on SmolLM2), and
moves two rows per (layer, block, head) of the cache. torch spends about a microsecond per small
matrix in a batched matmul (more in bf16, ~25 us per call on top), and building index tensors
for the row moves cost more than moving the rows. These loops read each matrix once, sum in
fp32, and move rows in place through the layout's offsets (kv_layout.row_offsets):

    out = row_matmul(x, m)                              # x [B, g, d], m [B, d, d]: out[b] = x[b] @ m[b]
    q2, k2, v2 = mix_qkv(q, k, v, mats)                 # a decode step's three products in one call
    swap_rows(cache, base, a, b, offsets)               # slab base[i]: rows a[i] and b[i] trade places
    move_rows(cache, base, dst, src, offsets)           # slab base[i]: row dst[i] <- row src[i], all gathered first

Other dtypes and devices fall back to torch (same result, slower).
"""

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

from .patches import llvmlite_vars

llvmlite_vars.install()  # before vLLM scans this process's modules again (patches/llvmlite_vars.py)


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bf16 bits (a 16-bit integer) -> the float32 they are the upper half of."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _f32_bits(typingctx, value):
    """float32 -> its bits (uint32)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _f32_to_bf16(value):
    """Round to nearest even, as torch's bf16 cast does; NaN stays NaN."""
    u = _f32_bits(value)
    if (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):
        return np.int16((u >> np.uint32(16)) | np.uint32(0x40))
    return np.int16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))


def _load(value):
    """An element of x or m as float32 (bf16 bits or float32)."""


@overload(_load, jit_options={"fastmath": True})
def _load_impl(value):
    if isinstance(value, types.Integer):
        return lambda value: _bf16_to_f32(value)
    return lambda value: value


def _rounded(value, like):
    """float32 value in the dtype of `like` (an element of out)."""


@overload(_rounded, jit_options={"fastmath": True})
def _rounded_impl(value, like):
    if isinstance(like, types.Integer):
        return lambda value, like: _f32_to_bf16(value)
    return lambda value, like: value


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _times(x, m, out, acc):
    """out = x @ m for one matrix: x, out [g, d], m [d, d] (bf16 bits or fp32), acc [g, d] fp32 scratch.

    Four rows of m per pass over the accumulator (a third fewer cycles than one, measured here).
    """
    rows, d = x.shape
    acc[:] = 0
    head = d - d % 4
    for i in range(0, head, 4):
        for r in range(rows):
            x0, x1, x2, x3 = _load(x[r, i]), _load(x[r, i + 1]), _load(x[r, i + 2]), _load(x[r, i + 3])
            for j in range(d):
                acc[r, j] += (x0 * _load(m[i, j]) + x1 * _load(m[i + 1, j])) + (x2 * _load(m[i + 2, j]) + x3 * _load(m[i + 3, j]))
    for i in range(head, d):
        for r in range(rows):
            xi = _load(x[r, i])
            for j in range(d):
                acc[r, j] += xi * _load(m[i, j])
    for r in range(rows):
        for j in range(d):
            out[r, j] = _rounded(acc[r, j], out[r, j])


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _row_matmul(x, m, out):
    """out[b] = x[b] @ m[b]: x, out [B, g, d], m [B, d, d]."""
    acc = np.empty(x.shape[1:], np.float32)
    for b in range(x.shape[0]):
        _times(x[b], m[b], out[b], acc)


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _mix_qkv(q, k, v, mats, q_out, k_out, v_out):
    """A decode step's q [n, H, g, d], k, v [n, H, 1, d] times row b's matrices: mats [4, R, H, d, d] of one layer
    (parts M, M^{-T}, A, A^{-1}; rows 0..n-1 are the step's)."""
    n, heads, g, d = q.shape
    acc_q, acc_kv = np.empty((g, d), np.float32), np.empty((1, d), np.float32)
    for b in range(n):
        for h in range(heads):
            _times(k[b, h], mats[0, b, h], k_out[b, h], acc_kv)
            _times(q[b, h], mats[1, b, h], q_out[b, h], acc_q)
            _times(v[b, h], mats[2, b, h], v_out[b, h], acc_kv)


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _swap_rows(flat, base, a, b, offsets):
    """flat: a cache's elements (any 16/32-bit view); rows a[i] and b[i] of the slab at base[i] trade places."""
    for i in range(base.shape[0]):
        if a[i] == b[i]:
            continue
        row_a, row_b, slab = offsets[a[i]], offsets[b[i]], base[i]
        for e in range(row_a.shape[0]):
            x, y = slab + row_a[e], slab + row_b[e]
            t = flat[x]
            flat[x] = flat[y]
            flat[y] = t


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _move_rows(flat, base, dst, src, offsets, tmp):
    """flat: a cache's elements (any 16/32-bit view); move i takes row src[i] of the slab at base[i] to row dst[i]."""
    moves, width = tmp.shape
    for i in range(moves):
        for e in range(width):
            tmp[i, e] = flat[base[i] + offsets[src[i], e]]
    for i in range(moves):
        for e in range(width):
            flat[base[i] + offsets[dst[i], e]] = tmp[i, e]


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _array(t: torch.Tensor, as_bits: bool) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor (bits for 16-bit floats, which numpy lacks)."""
    if t.dtype == torch.float32 and not as_bits:
        return t.numpy()
    return t.view(_BITS[t.dtype]).numpy()


def _fits(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == tensors[0].dtype for t in tensors) and tensors[0].dtype in KERNEL_DTYPES


def row_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """out[b] = x[b] @ m[b] for x [B, g, d], m [B, d, d] (fp32 sums, one rounding)."""
    assert x.shape[0] == m.shape[0] and x.shape[2] == m.shape[1] == m.shape[2], f"x {tuple(x.shape)} @ m {tuple(m.shape)}"
    if not _fits(x, m):
        return torch.matmul(x, m)
    x, m = x.contiguous(), m.contiguous()
    out = torch.empty_like(x)
    _row_matmul(_array(x, False), _array(m, False), _array(out, False))
    return out


def mix_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A decode step's q [n, H, g, d], k, v [n, H, 1, d] -> q M^{-T}, k M, v A with row b's matrices.

    mats: one layer's [4, R, H, d, d] (M, M^{-T}, A, A^{-1}), R >= n. One call for the three products.
    """
    n, heads, _, d = q.shape
    assert mats.shape[0] == 4 and mats.shape[1] >= n and mats.shape[2:] == (heads, d, d), f"mats {tuple(mats.shape)} for q {tuple(q.shape)}"
    if not _fits(q, k, v, mats) or not mats.is_contiguous():
        rows = mats[:, :n]
        return torch.matmul(q, rows[1]), torch.matmul(k, rows[0]), torch.matmul(v, rows[2])
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    outs = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _mix_qkv(*(_array(t, False) for t in (q, k, v, mats, *outs)))
    return outs


def swap_rows(cache: torch.Tensor, base: np.ndarray, a: np.ndarray, b: np.ndarray, offsets: np.ndarray) -> None:
    """In place in a contiguous CPU cache: rows a[i] and b[i] of the slab starting at element base[i] trade places.
    offsets [bs, 2d]: a slot's elements in its slab (kv_layout.row_offsets)."""
    assert cache.device.type == "cpu" and cache.is_contiguous(), f"cache on {cache.device}, contiguous={cache.is_contiguous()}"
    assert base.shape == a.shape == b.shape, f"swaps: base {base.shape}, a {a.shape}, b {b.shape}"
    _swap_rows(_array(cache.view(-1), True), base, a, b, offsets)


def move_rows(cache: torch.Tensor, base: np.ndarray, dst: np.ndarray, src: np.ndarray, offsets: np.ndarray) -> None:
    """In place in a contiguous cache: for each i, the row at slot src[i] of the slab starting at element base[i]
    goes to slot dst[i]; every source is read before any write. offsets [bs, 2d]: a slot's elements in its slab."""
    assert cache.device.type == "cpu" and cache.is_contiguous(), f"cache on {cache.device}, contiguous={cache.is_contiguous()}"
    assert base.shape == dst.shape == src.shape, f"moves: base {base.shape}, dst {dst.shape}, src {src.shape}"
    flat = _array(cache.view(-1), True)
    _move_rows(flat, base, dst, src, offsets, np.empty((len(base), offsets.shape[1]), flat.dtype))


def compile_for(dtype: torch.dtype) -> None:
    """Compile (or load from numba's cache) the loops a worker of this dtype runs, before its first step."""
    x = torch.zeros(1, 1, 1, 2, dtype=dtype)
    row_matmul(x[0], torch.zeros(1, 2, 2, dtype=dtype))
    mix_qkv(x, x, x, torch.zeros(4, 1, 1, 2, 2, dtype=dtype))
    index = np.zeros(1, np.int64)
    swap_rows(torch.zeros(2, dtype=dtype), index, index, index, np.zeros((1, 2), np.int64))
    move_rows(torch.zeros(2, dtype=dtype), index, index, index, np.zeros((1, 2), np.int64))
