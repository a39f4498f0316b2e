"""A faithful simulation of the per-request mode's cache for layout and attack tests (CONTEXT.md, issue 11).

On top of plain layer-0 K (after RoPE) and V of a request, under a static mix-v key: per
(layer, KV head) a fresh dense U diag(s) W (condition number <= 4) on K and another on V,
then per (layer, KV head) an independent uniform permutation of the rows inside each block
(K and V of a row together). Nothing of it is returned but the cache.

    obs = simulate_per_request(public, tokens, block_size=128, generator=torch.Generator().manual_seed(0))
"""

import math

import torch

from vllm_kvshield import transforms as T
from vllm_kvshield.attack.observation import Layout, Observation

STATIC_KEY = bytes(range(32))


def _dense(d: int, gen: torch.Generator) -> torch.Tensor:
    u, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = torch.exp((2 * torch.rand(d, generator=gen, dtype=torch.float64) - 1) * 0.5 * math.log(4.0))
    return u @ torch.diag(s) @ w


def static_layer0(public, tokens: list[int], mode: str, key: bytes = STATIC_KEY) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer-0 K, V [T, H, d] fp64 as a static mode caches them (transforms.py), before the engine's rounding."""
    s = public.shape
    shape = T.AttentionShape(num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim, hidden_size=s.hidden)
    ids = torch.tensor(tokens)
    k = public.rotate(public.layer0_k[ids], torch.arange(len(tokens))).double()
    v = public.layer0_v[ids].double()
    if mode == "none":
        return k, v
    lk = T.derive_layer_key(key, 0, shape, mode)
    k = torch.einsum("thd,hde->the", k[:, lk.kv_heads], lk.k_mat)
    if lk.mix is not None:
        k = torch.einsum("thd,hde->the", k, lk.mix)
    return k, torch.einsum("thd,hde->the", v[:, lk.kv_heads], lk.v_mat)


def simulate_static(public, tokens: list[int], mode: str, key: bytes = STATIC_KEY, block_size: int = 128) -> Observation:
    k, v = static_layer0(public, tokens, mode, key)
    return Observation((0,), k.bfloat16().float()[None], v.bfloat16().float()[None], Layout(block_size))


def per_request_cache(k: torch.Tensor, v: torch.Tensor, generator: torch.Generator, block_size: int = 128, shuffle: bool = True) -> Observation:
    """k (after RoPE), v [T, H, d] as the static transforms cached them -> the per-request mode's layer-0 cache:
    a fresh dense map per KV head on K and on V, bf16 rounding, rows shuffled per head inside blocks."""
    t_len, h, d = k.shape
    k = torch.stack([k[:, j].double() @ _dense(d, generator) for j in range(h)], 1).bfloat16().float()
    v = torch.stack([v[:, j].double() @ _dense(d, generator) for j in range(h)], 1).bfloat16().float()
    if shuffle:
        for j in range(h):
            for start in range(0, t_len, block_size):
                stop = min(start + block_size, t_len)
                perm = start + torch.randperm(stop - start, generator=generator)
                k[start:stop, j], v[start:stop, j] = k[perm, j].clone(), v[perm, j].clone()
    return Observation((0,), k[None], v[None], Layout(block_size, ordered=not shuffle, shared_key=False))


def simulate_per_request(public, tokens: list[int], generator: torch.Generator, block_size: int = 128, shuffle: bool = True) -> Observation:
    """One request under its own fresh key over mix-v (key STATIC_KEY), rows shuffled per head in blocks."""
    k, v = static_layer0(public, tokens, "mix-v")
    return per_request_cache(k, v, generator, block_size, shuffle)


def mix_v_over(public, k: torch.Tensor, v: torch.Tensor, key: bytes = STATIC_KEY) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain cached layer-0 k (after RoPE), v [T, H, d] (e.g. read from a plain engine) under mix-v's static transform."""
    s = public.shape
    shape = T.AttentionShape(num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim, hidden_size=s.hidden)
    lk = T.derive_layer_key(key, 0, shape, "mix-v")
    k = torch.einsum("thd,hde->the", k.double()[:, lk.kv_heads], lk.k_mat)
    return k, torch.einsum("thd,hde->the", v.double()[:, lk.kv_heads], lk.v_mat)
