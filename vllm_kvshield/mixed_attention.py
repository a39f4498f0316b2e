"""MixedAttention: vLLM's Attention layer behind the runtime mix, for every model family.

The mix happens after RoPE (and after Qwen3's q/k norms), so it belongs right in front of
vLLM's Attention layer (`self_attn.attn`), the one call every family's attention forward
makes with post-RoPE q and k. Wrapping that layer, not the family's forward, keeps the
families' code vLLM's own:

    self_attn.attn = MixedAttention(self_attn.attn, num_kv_heads=2, head_dim=64)
    self_attn.attn.install(mix, mix_q)     # [H_kv local, d, d] M_h and M_h^{-T}
    out = self_attn.attn(q, k, v)          # q [T, H_q*d], k, v [T, H_kv*d] -> [T, H_q*d]

Invariant: q'' k''^T == q k^T for k'' = k M_h, q'' = q M_h^{-T}, so the output is
Attention(q, k, v)'s while the cache holds k''.
"""

import torch
from torch import nn

from .transforms import mix_qk


class MixedAttention(nn.Module):
    """vLLM's Attention with k'' = k M_h, q'' = q M_h^{-T} applied to its inputs (this rank's KV heads)."""

    def __init__(self, attn: nn.Module, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.attn = attn
        self.register_buffer("qk_mix", torch.zeros(num_kv_heads, head_dim, head_dim), persistent=False)
        self.register_buffer("qk_mix_q", torch.zeros(num_kv_heads, head_dim, head_dim), persistent=False)

    def install(self, mix: torch.Tensor, mix_q: torch.Tensor) -> None:
        """Put M_h and M_h^{-T} [H_kv local, d, d] in place (from the enclave's DeviceMaterial)."""
        if mix.shape != self.qk_mix.shape or mix_q.shape != self.qk_mix.shape:
            raise ValueError(f"mix {tuple(mix.shape)} / {tuple(mix_q.shape)} does not fit {tuple(self.qk_mix.shape)}")
        self.qk_mix.copy_(mix)
        self.qk_mix_q.copy_(mix_q)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
        query, key = mix_qk(query, key, self.qk_mix, self.qk_mix_q)
        return self.attn(query, key, value, **kwargs)


def vllm_attention(attn: nn.Module) -> nn.Module:
    """vLLM's Attention layer of a self_attn.attn, wrapped or not (it holds kv_cache)."""
    return attn.attn if isinstance(attn, MixedAttention) else attn
