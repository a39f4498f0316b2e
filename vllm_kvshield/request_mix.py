"""Mode per-request at run time: each token mixed with its own request's matrices inside vLLM's batched forward.

A step's tokens are laid out batch row after batch row (attention metadata's query_start_loc),
and row i's matrices are row i of RequestKeyRows. Before the forward the model sets the step's
plan; each shielded attention layer then calls, around vLLM's unmodified attention,

    q, k, v = torch.ops.kvshield.request_mix(q, k, v, layer)   # k'' = k' M, q'' = q' M^{-T}, v'' = v' A
    o = torch.ops.kvshield.request_unmix(o, layer)             # o' = o'' A^{-1}, then W_O; then the
                                                               # step's after_attention(layer): the row shuffle

so q'' k''^T == q' k'^T and softmax(.) v'' A^{-1} == softmax(.) v': the layer's output is
unchanged while the KV cache holds k'', v''. With head size 64 on CPU (bf16 or fp32), every step,
decode, prefill or both, is one kernel call for q, k, v and one for o (kernels.py): token t takes
the matrices of row token_rows[t], read in place. Otherwise (other head sizes, dtypes, devices) a
decode step is one call per part; in a mixed step, a run of single-token rows is one call per part,
and the step's prefill chunks are one batched matmul per part (each chunk padded to the longest:
ChunkBatch), or one per chunk when padding would more than double the work. The ops are opaque
to torch.compile (custom ops), so the Python plan stays out of the graph. Without a plan (vLLM's
warm-up and profiling runs, no request in the batch) tokens are mixed with zero matrices: nothing
ever reaches the cache unmixed.
"""

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from . import kernels, request_keys

PARTS = {"k": 0, "q": 1, "v": 2, "o": 3}  # RequestKeyRows.material's part axis: M, M^{-T}, A, A^{-1}


@dataclass(frozen=True)
class StepPlan:
    """The tokens of one forward step by batch row."""

    num_rows: int
    num_tokens: int  # real tokens; any after them are padding
    runs: tuple[tuple[int, int, int], ...]  # (first row, end row, first token): consecutive rows of one token each
    chunks: tuple[tuple[int, int, int], ...]  # (row, first token, end token): rows of several tokens
    token_rows: np.ndarray = field(compare=False)  # [num_tokens] int64: each token's batch row

    @classmethod
    def from_query_start_loc(cls, starts: list[int]) -> "StepPlan":
        """starts: query_start_loc, [num_rows + 1] token offsets."""
        runs, chunks = [], []
        run_start = None
        for row in range(len(starts) - 1):
            single = starts[row + 1] - starts[row] == 1
            if single and run_start is None:
                run_start = row
            if not single:
                if run_start is not None:
                    runs.append((run_start, row, starts[run_start]))
                    run_start = None
                if starts[row + 1] > starts[row]:
                    chunks.append((row, starts[row], starts[row + 1]))
        if run_start is not None:
            runs.append((run_start, len(starts) - 1, starts[run_start]))
        token_rows = np.repeat(np.arange(len(starts) - 1), np.diff(starts))
        return cls(len(starts) - 1, starts[-1], tuple(runs), tuple(chunks), token_rows)

    @cached_property
    def chunk_batch(self) -> "ChunkBatch | None":
        """The step's chunks as one padded batch (built once, used by every layer and part), or None if padding
        to the longest chunk would more than double the tokens multiplied."""
        lengths = [end - start for _, start, end in self.chunks]
        if not lengths or len(lengths) * max(lengths) > 2 * sum(lengths):
            return None
        return ChunkBatch.of(self.chunks, max(lengths))


@dataclass(frozen=True)
class ChunkBatch:
    """A step's C prefill chunks padded to t_max tokens each, so each part of a layer is one [C*H] batched matmul."""

    rows: torch.Tensor  # [C] batch rows (whose matrices the chunks use)
    gather: torch.Tensor  # [C * t_max] step token of each padded slot (a chunk's last token repeats as padding)
    tokens: torch.Tensor  # [sum of lengths] step tokens of the chunks, chunk after chunk
    slots: torch.Tensor  # [sum of lengths] their padded slots
    t_max: int

    @classmethod
    def of(cls, chunks, t_max: int) -> "ChunkBatch":
        gather, tokens, slots = [], [], []
        for c, (_, start, end) in enumerate(chunks):
            gather += [min(start + i, end - 1) for i in range(t_max)]
            tokens += range(start, end)
            slots += range(c * t_max, c * t_max + end - start)
        as_index = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
        return cls(as_index([row for row, _, _ in chunks]), as_index(gather), as_index(tokens), as_index(slots), t_max)

    def matmul(self, x: torch.Tensor, mats: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] = x[t] times its chunk's matrices, for the chunks' tokens. x, out [T, H*g*d]; mats [R, H, d, d]."""
        chunks, heads, d = len(self.rows), mats.shape[1], mats.shape[-1]
        g = x.shape[1] // (heads * d)
        padded = x.index_select(0, self.gather).view(chunks, self.t_max, heads, g, d)
        padded = padded.transpose(1, 2).reshape(chunks * heads, self.t_max * g, d)  # [C*H, t_max*g, d]
        prod = torch.bmm(padded, mats.index_select(0, self.rows).view(chunks * heads, d, d))
        prod = prod.view(chunks, heads, self.t_max, g, d).transpose(1, 2).reshape(chunks * self.t_max, -1)
        out.index_copy_(0, self.tokens, prod.index_select(0, self.slots))


_plan: StepPlan | None = None
_after_attention: Callable[[int], None] | None = None
_vector: "kernels.VectorStep | None" = None  # the step's vector-code calls, built at its first layer


def begin_step(plan: StepPlan | None, after_attention: Callable[[int], None] | None = None) -> None:
    """Set (or, with None, end) the step; after_attention(layer) runs once each layer's attention has run."""
    global _plan, _after_attention, _vector
    _plan, _after_attention, _vector = plan, after_attention, None


def _decode_rows(x: torch.Tensor) -> int | None:
    """n when this step is n batch rows of one token each (a decode step) and x holds just those tokens."""
    if _plan is not None and _plan.runs == ((0, _plan.num_rows, 0),) and x.shape[0] == _plan.num_tokens:
        return _plan.num_rows
    return None


def _apply(x: torch.Tensor, layer: int, part: str, heads: int) -> torch.Tensor:
    """x [T, H*g*d] (g rows per KV head) times its row's matrix of `part`, per token and KV head."""
    if _plan is None:
        return torch.zeros_like(x)
    mats = request_keys.current().layer(layer)[PARTS[part]]  # [R, H, d, d]
    d = mats.shape[-1]
    n = _decode_rows(x)
    if n is not None:  # one call
        return kernels.row_matmul(x.reshape(n * heads, -1, d), mats[:n].view(n * heads, d, d)).view(n, -1)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if x.shape[0] > _plan.num_tokens:
        out[_plan.num_tokens :] = 0  # padding tokens
    xs, outs = x.view(x.shape[0], heads, -1, d), out.view(x.shape[0], heads, -1, d)  # [T, H, g, d]
    for first, end, token in _plan.runs:
        n = end - first
        m = mats[first:end].reshape(n * heads, d, d)  # contiguous rows: a view
        outs[token : token + n] = kernels.row_matmul(xs[token : token + n].reshape(n * heads, -1, d), m).view(n, heads, -1, d)
    batch = _plan.chunk_batch
    if batch is not None:
        batch.matmul(x, mats, out)
    else:
        for row, start, end in _plan.chunks:
            outs[start:end] = torch.einsum("thgd,hde->thge", xs[start:end], mats[row])
    return out


def _vector_step(x: torch.Tensor) -> "kernels.VectorStep | None":
    """The step's vector-code calls when it runs on them (head size D, CPU, bf16 or fp32): every token of the step,
    decode or prefill, in one call per layer and direction; built at the step's first layer."""
    global _vector
    if _vector is None and _plan is not None:
        rows = request_keys.current()
        material = rows.material  # [L, 4, R, H, d, d]
        if kernels.vector_ready(material, x):
            _vector = kernels.VectorStep(material, rows.layers[0], _plan.token_rows)
    return _vector


def request_mix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q [T, H_q*d], k, v [T, H_kv*d] -> q M^{-T}, k M, v A with each token's request's matrices."""
    step = _vector_step(q)
    if step is not None:
        return step.mix(q, k, v, layer)
    n = _decode_rows(q)
    if n is not None:  # the three products in one call
        mats = request_keys.current().layer(layer)  # [4, R, H, d, d]
        d = mats.shape[-1]
        mixed = kernels.mix_qkv(q.view(n, kv_heads, -1, d), k.view(n, kv_heads, 1, d), v.view(n, kv_heads, 1, d), mats)
        return tuple(t.view(n, -1) for t in mixed)
    return _apply(q, layer, "q", kv_heads), _apply(k, layer, "k", kv_heads), _apply(v, layer, "v", kv_heads)


def request_unmix(o: torch.Tensor, layer: int, kv_heads: int) -> torch.Tensor:
    """Attention output o [T, H_q*d] -> o A^{-1}, before W_O."""
    step = _vector_step(o)
    out = step.product(o, layer, PARTS["o"]) if step is not None else _apply(o, layer, "o", kv_heads)
    if _after_attention is not None:
        _after_attention(layer)
    return out


def _request_mix_fake(q, k, v, layer: int, kv_heads: int):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _request_unmix_fake(o, layer: int, kv_heads: int):
    return torch.empty_like(o)


_library = None


def register_ops() -> None:
    """torch.ops.kvshield.request_mix / request_unmix (once per process)."""
    global _library
    if _library is not None:
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    _library = torch.library.Library("kvshield", "FRAGMENT")
    direct_register_custom_op("request_mix", request_mix, fake_impl=_request_mix_fake, target_lib=_library)
    direct_register_custom_op("request_unmix", request_unmix, fake_impl=_request_unmix_fake, target_lib=_library)
