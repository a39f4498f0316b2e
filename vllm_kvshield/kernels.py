"""CPU loops of mode per-request's runtime mix and row shuffle, compiled with numba (which vLLM's CPU build already needs).

Per decode step a worker multiplies each request's q, k, v and attention output by that
request's own d x d matrices: 4 L H_kv B small products (11,520 at batch 32 on SmolLM2), and
moves two rows per (layer, block, head) of the cache. torch spends about a microsecond per small
matrix in a batched matmul (more in bf16, ~25 us per call on top), and building index tensors
for the row moves cost more than moving the rows. These loops read each matrix once, sum in
fp32, and move rows in place through the layout's offsets (kv_layout.row_offsets):

    out = row_matmul(x, m)                              # x [B, g, d], m [B, d, d]: out[b] = x[b] @ m[b]
    q2, k2, v2 = mix_qkv(q, k, v, mats, rows)           # a step's three products in one call, token t: row rows[t]
    o2 = rows_matmul(o, mats[3], rows)                  # o [T, H, g, d]: o2[t, h] = o[t, h] @ mats[3][rows[t], h]
    swap_rows(cache, base, a, b, offsets)               # slab base[i]: rows a[i] and b[i] trade places
    move_rows(cache, base, dst, src, offsets)           # slab base[i]: row dst[i] <- row src[i], all gathered first
    touch(mats[1])                                      # read one word of each 64-byte line: into the caches

For head size 64 (SmolLM2's) each d x d product is one straight run of 512-bit vector code that
numba emits from LLVM IR (_emit_product): the matrix is read once, row by row, its bf16 pairs
widened by one shift (even columns) and one mask (odd columns), the g rows' fp32 sums kept in
registers, and the next product's matrix prefetched meanwhile (without that, each 8 KiB matrix
began with cache misses the hardware prefetcher does not cover). The results are bit-identical to
the scalar loops (_times), which serve every other head size and layout. Measured here at batch
32 (30 layers of mix_qkv + row_matmul, 90 MiB of matrices, one thread): 5.9 -> 4.3 ms, near the
4.2 ms it takes just to read the matrices. A prefill chunk's tokens share their request's matrices
(rows repeat), which then come from cache: one layer of 32 chunks of 128 tokens and 16 decodes,
mix and unmix, 9.5 ms, against 11.4 ms for padded batched matmuls (request_mix.ChunkBatch) and
0.17 against 0.60 ms for one chunk of 16 tokens beside them (the step of a request that just came).

Other dtypes and devices fall back to torch (same result, slower).
"""

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
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


# vector code for head size D

D = 64  # 4 fp32 vectors of 16 lanes per row: G <= 3 rows' sums stay in registers (zmm0-31) with a matrix row
_F32, _I32, _I16, _I64 = ir.FloatType(), ir.IntType(32), ir.IntType(16), ir.IntType(64)
_VF, _VI = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)


def _splat_i32(value):
    return ir.Constant(_VI, [value] * 16)


def _emit_product(builder, xp, mp, op, pp, G, bf16):
    """out[r, :] = x[r, :] @ m for r < G: xp, mp, op are i64 addresses of x [G, D], m [D, D], out [G, D] (rows
    contiguous); pp the address of the next product's matrix, prefetched meanwhile. Straight-line code: i unrolled,
    one fp32 multiply-add chain per output element; the results equal _times' bit for bit (tests/test_kernels.py)."""
    module = builder.module
    fma = cgutils.get_or_insert_function(module, ir.FunctionType(_VF, [_VF, _VF, _VF]), "llvm.fma.v16f32")
    esize = 2 if bf16 else 4
    prefetch = cgutils.get_or_insert_function(module, ir.FunctionType(ir.VoidType(), [ir.PointerType(ir.IntType(8)), _I32, _I32, _I32]), "llvm.prefetch.p0")
    nvec = D // 16  # fp32 vectors per row of out
    undef_f = ir.Constant(_VF, ir.Undefined)
    zero_mask = ir.Constant(ir.VectorType(_I32, 16), [0] * 16)

    def addr(base, offset, ty):
        return builder.inttoptr(builder.add(base, ir.Constant(_I64, offset)), ir.PointerType(ty))

    def xval(r, i):
        if bf16:
            bits = builder.load(addr(xp, (r * D + i) * 2, _I16), typ=_I16, align=2)
            val = builder.bitcast(builder.shl(builder.zext(bits, _I32), ir.Constant(_I32, 16)), _F32)
        else:
            val = builder.load(addr(xp, (r * D + i) * 4, _F32), typ=_F32, align=4)
        return builder.shuffle_vector(builder.insert_element(undef_f, val, ir.Constant(_I32, 0)), undef_f, zero_mask)

    zero = ir.Constant(_VF, [0.0] * 16)
    # acc[r][k]: row r, vector k; for bf16 k = 2 * word + (0: even columns | 1: odd columns)
    acc = [[zero] * nvec for _ in range(G)]
    hi_mask = _splat_i32(0xFFFF0000 - (1 << 32))
    sixteen = _splat_i32(16)
    for i in range(D):
        per_i = D * esize // 64  # cache lines of the next matrix to prefetch per row of this one
        for line in range(per_i):  # read (0), no temporal locality (prefetchnta: read once per step), data (1)
            builder.call(prefetch, [builder.inttoptr(builder.add(pp, ir.Constant(_I64, (i * per_i + line) * 64)), ir.PointerType(ir.IntType(8))),
                                    ir.Constant(_I32, 0), ir.Constant(_I32, 0), ir.Constant(_I32, 1)])
        if bf16:
            cols = []
            for w in range(D // 32):
                word = builder.load(addr(mp, i * D * 2 + w * 64, _VI), typ=_VI, align=2)
                cols.append(builder.bitcast(builder.shl(word, sixteen), _VF))
                cols.append(builder.bitcast(builder.and_(word, hi_mask), _VF))
        else:
            cols = [builder.load(addr(mp, (i * D + 16 * k) * 4, _VF), typ=_VF, align=4) for k in range(nvec)]
        for r in range(G):
            xv = xval(r, i)
            for k in range(nvec):
                acc[r][k] = builder.call(fma, [xv, cols[k], acc[r][k]])
    for r in range(G):
        if bf16:
            for w in range(D // 32):
                even = builder.bitcast(acc[r][2 * w], _VI)
                odd = builder.bitcast(acc[r][2 * w + 1], _VI)
                lo, hi = _bf16_bits(builder, even, low=True), _bf16_bits(builder, odd, low=False)
                builder.store(builder.or_(lo, hi), addr(op, (r * D + 32 * w) * 2, _VI), align=2)
        else:
            for k in range(nvec):
                builder.store(acc[r][k], addr(op, (r * D + 16 * k) * 4, _VF), align=4)


def _bf16_bits(builder, u, low):
    """fp32 bits u (16 lanes) rounded to bf16 as _f32_to_bf16 does; in the low half (low) or the high half of each lane."""
    abs_u = builder.and_(u, _splat_i32(0x7FFFFFFF))
    nan = builder.icmp_unsigned(">", abs_u, _splat_i32(0x7F800000))
    lsb = builder.and_(builder.lshr(u, _splat_i32(16)), _splat_i32(1))
    rounded = builder.add(builder.add(u, _splat_i32(0x7FFF)), lsb)
    if low:
        normal = builder.lshr(rounded, _splat_i32(16))
        quiet = builder.or_(builder.lshr(u, _splat_i32(16)), _splat_i32(0x40))
    else:
        mask = _splat_i32(0xFFFF0000 - (1 << 32))
        normal = builder.and_(rounded, mask)
        quiet = builder.and_(builder.or_(u, _splat_i32(0x400000)), mask)
    return builder.select(nan, quiet, normal)


AHEAD = 1  # while computing one product, prefetch the matrix of the product after it (further ahead: no faster here)


def _make_kernel(G):
    """An intrinsic (x address, m address, out address, prefetch address, like) computing one product of G rows."""
    @intrinsic
    def kernel(typingctx, xp, mp, op, pp, like):
        bf16 = isinstance(like, types.Integer)
        if not bf16 and like != types.float32:
            return None

        def codegen(context, builder, signature, args):
            xa, ma, oa, pa = (builder.zext(a, _I64) if a.type.width < 64 else a for a in args[:4])
            _emit_product(builder, xa, ma, oa, pa, G, bf16)
            return context.get_dummy_value()

        return types.void(xp, mp, op, pp, like), codegen

    return kernel


_k1 = _make_kernel(1)
_k2 = _make_kernel(2)
_k3 = _make_kernel(3)


def _element_size(like):
    pass


@overload(_element_size, inline="always")
def _element_size_impl(like):
    if isinstance(like, types.Integer):
        return lambda like: 2
    return lambda like: 4


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False, inline="always")
def _rows(xp, mp, op, pp, g, like):
    """All g rows of one product, three at a time; rows D elements apart. pp: matrix to prefetch meanwhile."""
    step = D * _element_size(like)
    r = 0
    while g - r >= 3:
        _k3(xp + r * step, mp, op + r * step, pp, like)
        r += 3
        pp = mp  # already here
    if g - r == 2:
        _k2(xp + r * step, mp, op + r * step, pp, like)
    elif g - r == 1:
        _k1(xp + r * step, mp, op + r * step, pp, like)


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _rows_matmul_at(xp, x_row, mp, ms1, ms2, op, rows, heads, g, like):
    """out[b, h] = x[b, h] @ m[rows[b], h] for b < len(rows), by address: token b's x at xp + b * x_row holds
    [H, g, D] contiguous; m's matrices contiguous, ms1 (row) and ms2 (head) bytes apart; out contiguous [n, H, g, D]."""
    size, n = _element_size(like), rows.shape[0]
    for b in range(n):
        mb, after = mp + rows[b] * ms1, mp + rows[min(b + AHEAD, n - 1)] * ms1
        for h in range(heads):
            ahead = mb + (h + AHEAD) * ms2 if h + AHEAD < heads else after + (h + AHEAD - heads) * ms2
            at = (b * heads + h) * g * D * size
            _rows(xp + b * x_row + h * g * D * size, mb + h * ms2, op + at, ahead, g, like)


@numba.njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _mat_addr(mp, rows, t, heads, ms0, ms1, ms2):
    """Address of product t's matrix in _mix_qkv_at's order (k, q, v of token 0 head 0, head 1, ...): parts 0, 1, 2."""
    p = t % 3
    bh = t // 3
    return mp + p * ms0 + rows[min(bh // heads, rows.shape[0] - 1)] * ms1 + (bh % heads) * ms2


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _mix_qkv_at(qp, q_row, kp, k_row, vp, v_row, mp, ms0, ms1, ms2, qop, kop, vop, rows, heads, g, like):
    """mix_qkv by address: token b (b < len(rows)) of q holds [H, g, D] contiguous, of k and v [H, D]; q_row, k_row,
    v_row the bytes between tokens; token b takes the matrices of row rows[b], at mp with byte strides ms0 (part),
    ms1 (row), ms2 (head), each matrix contiguous; the outputs contiguous [n, H, g or 1, D]."""
    size = _element_size(like)
    t = 0
    for b in range(rows.shape[0]):
        for h in range(heads):
            mb = mp + rows[b] * ms1 + h * ms2
            kv_at, q_at = (b * heads + h) * D * size, (b * heads + h) * g * D * size
            _k1(kp + b * k_row + h * D * size, mb, kop + kv_at, _mat_addr(mp, rows, t + AHEAD, heads, ms0, ms1, ms2), like)
            _rows(qp + b * q_row + h * g * D * size, mb + ms0, qop + q_at, _mat_addr(mp, rows, t + 1 + AHEAD, heads, ms0, ms1, ms2), g, like)
            _k1(vp + b * v_row + h * D * size, mb + 2 * ms0, vop + kv_at, _mat_addr(mp, rows, t + 2 + AHEAD, heads, ms0, ms1, ms2), like)
            t += 3


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _row_matmul(x, m, out):
    """out[b] = x[b] @ m[b]: x, out [B, g, d], m [B, d, d]. The scalar loops (row_matmul takes the vector code)."""
    acc = np.empty(x.shape[1:], np.float32)
    for b in range(x.shape[0]):
        _times(x[b], m[b], out[b], acc)


@numba.njit(cache=True, nogil=True, fastmath=True, boundscheck=False)
def _mix_qkv(q, k, v, mats, rows, q_out, k_out, v_out):
    """q [n, H, g, d], k, v [n, H, 1, d], token b times row rows[b]'s matrices: mats [4, R, H, d, d] of one layer
    (parts M, M^{-T}, A, A^{-1}). The scalar loops (mix_qkv takes the vector code)."""
    heads, g, d = q.shape[1:]
    acc_q, acc_kv = np.empty((g, d), np.float32), np.empty((1, d), np.float32)
    for b in range(rows.shape[0]):
        r = rows[b]
        for h in range(heads):
            _times(k[b, h], mats[0, r, h], k_out[b, h], acc_kv)
            _times(q[b, h], mats[1, r, h], q_out[b, h], acc_q)
            _times(v[b, h], mats[2, r, h], v_out[b, h], acc_kv)


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
        row, slab = offsets[src[i]], base[i]
        for e in range(width):
            tmp[i, e] = flat[slab + row[e]]
    for i in range(moves):
        row, slab = offsets[dst[i]], base[i]
        for e in range(width):
            flat[slab + row[e]] = tmp[i, e]


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _touch(words):
    """Read one 8-byte word of each 64-byte line of words (int64): the lines come into the caches."""
    total = 0
    for i in range(0, words.shape[0], 8):
        total += words[i]
    return total


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}
KERNEL_DTYPES = (torch.bfloat16, torch.float32)


def _array(t: torch.Tensor, as_bits: bool) -> np.ndarray:
    """A numpy view of a contiguous CPU tensor (bits for 16-bit floats, which numpy lacks)."""
    if t.dtype == torch.float32 and not as_bits:
        return t.numpy()
    return t.view(_BITS[t.dtype]).numpy()


_LIKE = {torch.bfloat16: np.int16(0), torch.float32: np.float32(0)}  # tells the vector code the element type


def _fits(*tensors: torch.Tensor) -> bool:
    dtype = tensors[0].dtype
    return dtype in KERNEL_DTYPES and all(t.is_cpu and t.dtype == dtype for t in tensors)


def vector_ready(mats: torch.Tensor, *tensors: torch.Tensor) -> bool:
    """The vector code takes mats [..., D, D] (head size D) with these tensors: all on CPU, in one kernel dtype."""
    return mats.shape[-1] == D and _fits(mats, *tensors)


def row_matmul(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """out[b] = x[b] @ m[b] for x [B, g, d], m [B, d, d] (fp32 sums, one rounding)."""
    assert x.shape[0] == m.shape[0] and x.shape[2] == m.shape[1] == m.shape[2], f"x {tuple(x.shape)} @ m {tuple(m.shape)}"
    if not _fits(x, m):
        return torch.matmul(x, m)
    if x.shape[2] == D:
        return rows_matmul(x[:, None], m.contiguous()[:, None], np.arange(x.shape[0]))[:, 0]
    x, m = x.contiguous(), m.contiguous()
    out = torch.empty_like(x)
    _row_matmul(_array(x, False), _array(m, False), _array(out, False))
    return out


def _zero_tail(outs, rows: np.ndarray):
    """Tokens from len(rows) on (vLLM's padding) come out zero: nothing leaves unmixed."""
    for out in outs:
        if out.shape[0] > rows.shape[0]:
            out[rows.shape[0] :] = 0
    return outs


class VectorStep:
    """One step's vector-code products (head size D), with what its layers share worked out once: the material's
    address and byte strides and the token rows. Per layer only the activations' addresses change (a call costs a
    few microseconds of Python, where the tensor wrappers' checks and views cost about 20).

        step = VectorStep(material, first_layer=0, rows=np.array([0, 0, 1]))  # material [L, 4, R, H, D, D]
        q2, k2, v2 = step.mix(q, k, v, layer=3)    # q [T, H*g*D], k, v [T, H*D]: token t with row rows[t]'s M^{-T}, M, A
        o2 = step.product(o, layer=3, part=3)      # o [T, H*g*D] @ A^{-1} of each token's row

    Tokens from len(rows) on (vLLM's padding) come out zero. Each token's row of q, k, v, o must be contiguous
    (vLLM's split of qkv gives such views: they are read in place).
    """

    def __init__(self, material: torch.Tensor, first_layer: int, rows: np.ndarray):
        assert material.is_cpu and material.is_contiguous() and material.dtype in KERNEL_DTYPES and material.shape[-2:] == (D, D), \
            f"material {tuple(material.shape)} {material.dtype} on {material.device}, contiguous={material.is_contiguous()}"
        self._material = material  # keeps the storage the addresses point into
        self.dtype, self.like, self.size = material.dtype, _LIKE[material.dtype], material.element_size()
        self.heads = material.shape[3]
        self.base = material.data_ptr() - first_layer * material.stride(0) * self.size
        self.layer_bytes, self.part_bytes, self.row_bytes, self.head_bytes = (s * self.size for s in material.stride()[:4])
        self.rows = rows

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [T, H*g*D], k, v [T, H*D] -> q M^{-T}, k M, v A (parts 1, 0, 2), each token with its row's matrices."""
        q, k, v = (x if x.stride(1) == 1 else x.contiguous() for x in (q, k, v))
        t, width = q.shape
        assert t >= self.rows.shape[0] and width % (self.heads * D) == 0 and k.shape == v.shape == (t, self.heads * D) \
            and q.dtype == k.dtype == v.dtype == self.dtype, \
            f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)}, v {tuple(v.shape)} for {self.heads} heads, {self.rows.shape[0]} tokens, {self.dtype}"
        outs = torch.empty(q.shape, dtype=self.dtype), torch.empty(k.shape, dtype=self.dtype), torch.empty(v.shape, dtype=self.dtype)
        size = self.size
        _mix_qkv_at(q.data_ptr(), q.stride(0) * size, k.data_ptr(), k.stride(0) * size, v.data_ptr(), v.stride(0) * size,
                    self.base + layer * self.layer_bytes, self.part_bytes, self.row_bytes, self.head_bytes,
                    outs[0].data_ptr(), outs[1].data_ptr(), outs[2].data_ptr(), self.rows, self.heads, width // (self.heads * D), self.like)
        return _zero_tail(outs, self.rows)

    def product(self, x: torch.Tensor, layer: int, part: int) -> torch.Tensor:
        """x [T, H*g*D] -> out[t, h] = x[t, h] @ material[layer, part, rows[t], h]."""
        x = x if x.stride(1) == 1 else x.contiguous()
        t, width = x.shape
        assert t >= self.rows.shape[0] and width % (self.heads * D) == 0 and x.dtype == self.dtype, \
            f"x {tuple(x.shape)} {x.dtype} for {self.heads} heads, {self.rows.shape[0]} tokens, {self.dtype}"
        out = torch.empty(x.shape, dtype=self.dtype)
        _rows_matmul_at(x.data_ptr(), x.stride(0) * self.size, self.base + layer * self.layer_bytes + part * self.part_bytes,
                        self.row_bytes, self.head_bytes, out.data_ptr(), self.rows, self.heads, width // (self.heads * D), self.like)
        return _zero_tail((out,), self.rows)[0]


def rows_matmul(x: torch.Tensor, m: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
    """out[b, h] = x[b, h] @ m[rows[b], h] for x [n, H, g, d], m [R, H, d, d], rows np.int64 [n' <= n] (each < R);
    tokens from n' on come out zero. Head size D: the vector code (VectorStep), reading x's tokens in place."""
    n, heads, g, d = x.shape
    assert m.shape[1:] == (heads, d, d) and rows.shape[0] <= n, f"x {tuple(x.shape)}, m {tuple(m.shape)}, rows {rows.shape}"
    if not vector_ready(m, x) or not m.is_contiguous():
        got = torch.matmul(x[: rows.shape[0]], m.index_select(0, torch.from_numpy(rows)))
        return torch.cat([got, x.new_zeros(n - rows.shape[0], heads, g, d)]) if rows.shape[0] < n else got
    return VectorStep(m[None, None], 0, rows).product(x.reshape(n, -1), 0, 0).view(x.shape)


def mix_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mats: torch.Tensor, rows: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [n, H, g, d], k, v [n, H, 1, d] -> q M^{-T}, k M, v A, token b with row rows[b]'s matrices (default: b).

    mats: one layer's [4, R, H, d, d] (M, M^{-T}, A, A^{-1}); rows np.int64 [n' <= n], each < R; tokens from n' on
    (padding) come out zero. One call for the three products; for d == D the vector code (VectorStep), by address:
    tokens of q, k, v that are views into a wider row (vLLM's split of qkv) are read in place.
    """
    n, heads, g, d = q.shape
    rows = np.arange(n) if rows is None else rows
    assert mats.shape[0] == 4 and mats.shape[2:] == (heads, d, d) and rows.shape[0] <= n, f"mats {tuple(mats.shape)}, rows {rows.shape} for q {tuple(q.shape)}"
    assert k.shape == v.shape == (n, heads, 1, d), f"k {tuple(k.shape)}, v {tuple(v.shape)} for q {tuple(q.shape)}"
    if not _fits(q, k, v, mats) or not mats.is_contiguous():
        return rows_matmul(q, mats[1], rows), rows_matmul(k, mats[0], rows), rows_matmul(v, mats[2], rows)
    if d == D:
        outs = VectorStep(mats[None], 0, rows).mix(q.reshape(n, -1), k.reshape(n, -1), v.reshape(n, -1), 0)
        return tuple(o.view(x.shape) for o, x in zip(outs, (q, k, v)))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    outs = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _mix_qkv(*(_array(t, False) for t in (q, k, v, mats)), rows, *(_array(t, False) for t in outs))
    return _zero_tail(outs, rows)


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


def touch(t: torch.Tensor) -> int:
    """Bring a contiguous CPU tensor's cache lines into the CPU's caches: the sum of the first 8-byte word of each
    64-byte line, as int64 (read to be read, not used)."""
    assert t.is_cpu and t.is_contiguous() and t.numel() * t.element_size() % 8 == 0, f"{tuple(t.shape)} {t.dtype} on {t.device}"
    return int(_touch(t.view(-1).view(torch.int64).numpy()))


def compile_for(dtype: torch.dtype) -> None:
    """Compile (or load from numba's cache) the loops a worker of this dtype runs, before its first step."""
    x = torch.zeros(1, 1, 1, 2, dtype=dtype)
    row_matmul(x[0], torch.zeros(1, 2, 2, dtype=dtype))
    mix_qkv(x, x, x, torch.zeros(4, 1, 1, 2, 2, dtype=dtype))
    y = torch.zeros(1, 1, 1, D, dtype=dtype)
    mix_qkv(y, y, y, torch.zeros(4, 1, 1, D, D, dtype=dtype))
    rows_matmul(y, torch.zeros(1, 1, D, D, dtype=dtype), np.zeros(1, np.int64))
    index = np.zeros(1, np.int64)
    swap_rows(torch.zeros(2, dtype=dtype), index, index, index, np.zeros((1, 2), np.int64))
    move_rows(torch.zeros(2, dtype=dtype), index, index, index, np.zeros((1, 2), np.int64))
    touch(torch.zeros(8, dtype=torch.int64))
