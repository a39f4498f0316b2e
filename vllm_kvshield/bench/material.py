"""Mode per-request's runtime matrices: their size, what a worker holds, how long generating them takes,
and the bytes a decode step reads (for the GPU estimate in benchmarks/README.md; arithmetic, not a measurement).

One request in the batch carries, per layer and KV head, M, M^{-T}, A, A^{-1}: 4 L H_kv d^2 numbers in
the model's dtype (SmolLM2-135M in bf16: 4 * 30 * 3 * 64^2 * 2 B = 2.81 MiB).

    held = llm.apply_model(held_material)[0]   # in the worker: row bytes, rows held, bytes held
    request_bytes(layers=30, kv_heads=3, head_dim=64, dtype_bytes=2)      # 2949120
    generation_seconds(layers=30, kv_heads=3, head_dim=64, batches=(1, 32), repeats=3)
    step_seconds(layers=30, q_heads=9, kv_heads=3, head_dim=64, batch=32, dtype=torch.bfloat16, repeats=5)
    decode_step_bytes(LLAMA3_8B, batch=256, context=0)                    # weights, KV, matrices per step
"""

import secrets
import time
from dataclasses import dataclass

import torch

from .. import transforms
from . import stats

MiB = 1 << 20
GiB = 1 << 30


def request_bytes(layers: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """One request's matrices: 4 L H_kv d^2 numbers (M, M^{-T}, A, A^{-1} per layer and KV head)."""
    return 4 * layers * kv_heads * head_dim * head_dim * dtype_bytes


def held_material(model) -> dict:
    """Run in the worker (LLM.apply_model): the request matrices it holds now. Rows only grow (doubling, up to
    max_num_seqs), so after a run the rows held are the peak the run needed."""
    from vllm_kvshield import request_keys

    rows = request_keys.current()
    return {
        "row_bytes": rows.row_bytes,
        "rows": int(rows.material.shape[2]),
        "bytes": rows.nbytes,
        "max_rows": rows.max_rows,
        "dtype": str(rows.material.dtype).removeprefix("torch."),
        "live_requests": len(rows.key_ids),
        "fetched_ahead": rows.fetched_ahead().get("held", 0),  # requests not yet here whose matrices it holds
    }


def generation_seconds(layers: int, kv_heads: int, head_dim: int, batches: tuple[int, ...], repeats: int) -> dict:
    """Seconds transforms.request_material takes (fp32, this process, all its threads) for n requests at once:
    what the enclave spends on n requests (ahead of them, or while the step that adds them waits). Median over
    repeats, per n."""
    out = {}
    for n in batches:
        seeds = [secrets.token_bytes(transforms.KEY_BYTES) for _ in range(n)]  # throwaway: timing only
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            transforms.request_material(seeds, range(layers), range(kv_heads), head_dim)
            times.append(time.perf_counter() - t0)
        out[str(n)] = {"requests": n, "seconds": stats.median(times), "per_request_s": stats.median(times) / n,
                       "qr_per_request": 4 * layers * kv_heads, "repeats": repeats, "torch_threads": torch.get_num_threads()}
    return out


def step_seconds(layers: int, q_heads: int, kv_heads: int, head_dim: int, batch: int, dtype, repeats: int) -> dict:
    """Seconds one decode step of `batch` requests (one token each, each in its own block) spends in mode
    per-request's own work, with the worker's functions on synthetic tensors in this process: request_mix and
    request_unmix for every layer (q, k, v, o times the row's matrices), and the row shuffle of every layer's
    cache (cache_shuffle.shuffle_step, in the KV layout vLLM picks for this dtype on this CPU). Median over repeats. The mixes' inputs are random, as the timing needs."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from .. import cache_shuffle, kv_layout, request_keys, request_mix

    block_size = 128
    rows = request_keys.RequestKeyRows(range(layers), range(kv_heads), head_dim, max_rows=batch, dtype=dtype,
                                       device="cpu", materials=None)  # never asked: the rows are set below
    rows.material = torch.randn(layers, 4, batch, kv_heads, head_dim, head_dim).to(dtype)
    q = torch.randn(batch, q_heads * head_dim).to(dtype)
    k, v = torch.randn(batch, kv_heads * head_dim).to(dtype), torch.randn(batch, kv_heads * head_dim).to(dtype)
    caches = [torch.zeros(batch, kv_heads, block_size, 2 * head_dim, dtype=dtype) for _ in range(layers)]
    starts, seq_lens = list(range(batch + 1)), [block_size // 2] * batch  # row r: its one new token in block r
    block_table = torch.arange(batch)[:, None]
    offsets = kv_layout.row_offsets(_get_attn_isa(dtype, block_size, head_dim), block_size, head_dim, dtype)  # the layout vLLM picks here
    saved_rows = request_keys._rows
    request_keys.install(rows)
    request_mix.begin_step(request_mix.StepPlan.from_query_start_loc(starts))
    mix, shuffle = [], []
    try:
        for _ in range(repeats + 1):  # the first: warm-up
            t0 = time.perf_counter()
            for layer in range(layers):
                request_mix.request_mix(q, k, v, layer, kv_heads)
                request_mix.request_unmix(q, layer, kv_heads)
            t1 = time.perf_counter()
            cache_shuffle.shuffle_step(caches, starts, seq_lens, block_table, offsets, cache_shuffle.fresh_generator())
            mix.append(t1 - t0)
            shuffle.append(time.perf_counter() - t1)
    finally:
        request_mix.begin_step(None)
        request_keys._rows = saved_rows
    return {"batch": batch, "mix_unmix_s": stats.median(mix[1:]), "shuffle_s": stats.median(shuffle[1:]), "repeats": repeats,
            "torch_threads": torch.get_num_threads()}


@dataclass(frozen=True)
class ModelShape:
    """What a decode step reads: the weights once, each request's KV rows and (per-request) its matrices."""

    name: str
    parameters: float
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2


LLAMA3_8B = ModelShape("Llama-3-8B", parameters=8.03e9, layers=32, kv_heads=8, head_dim=128)


def decode_step_bytes(shape: ModelShape, batch: int, context: int) -> dict:
    """Bytes one decode step reads at this batch and mean context: weights, KV cache, per-request matrices; and the
    throughput ratio a purely memory-bound step predicts for mode per-request (plain bytes / per-request bytes)."""
    weights = shape.parameters * shape.dtype_bytes
    kv = batch * context * 2 * shape.layers * shape.kv_heads * shape.head_dim * shape.dtype_bytes
    matrices = batch * request_bytes(shape.layers, shape.kv_heads, shape.head_dim, shape.dtype_bytes)
    return {"weights": weights, "kv": kv, "matrices": matrices, "predicted_ratio": (weights + kv) / (weights + kv + matrices)}
