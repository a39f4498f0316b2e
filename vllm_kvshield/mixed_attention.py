"""MixedAttention: vLLM's Attention layer behind the runtime maps, for every model family.

The runtime maps act after RoPE (and after Qwen3's q/k norms), so they belong right in front
of vLLM's Attention layer (`self_attn.attn`), the one call every family's attention forward
makes with post-RoPE q and k. Wrapping that layer, not the family's forward, keeps the
families' code vLLM's own:

    self_attn.attn = MixedAttention(self_attn.attn, num_kv_heads=2, head_dim=64, static_mix=True)
    self_attn.attn.install(mix, mix_q)     # mode "mix": [H_kv local, d, d] M_h and M_h^{-T}
    out = self_attn.attn(q, k, v)          # q [T, H_q*d], k, v [T, H_kv*d] -> [T, H_q*d]

Mode "mix": k'' = k M_h, q'' = q M_h^{-T} (one M_h per KV head for the server's life), so
q'' k''^T == q k^T. Mode "per-request" (request_layer set): each token's own request's
M, M^{-T} on k, q and A on v, and A^{-1} on the attention output (request_mix's ops), so
softmax(q'' k''^T) v'' A^{-1} == softmax(q k^T) v. Either way the output is Attention(q, k, v)'s
while the cache holds the mixed k, v.
"""

import torch
from torch import nn

from .transforms import mix_qk


class MixedAttention(nn.Module):
    """vLLM's Attention with this rank's runtime maps applied around it."""

    def __init__(self, attn: nn.Module, num_kv_heads: int, head_dim: int, *, static_mix: bool, request_layer: int | None = None):
        super().__init__()
        self.attn = attn
        self.num_kv_heads = num_kv_heads  # this rank's
        self.request_layer = request_layer  # the layer's global index, for request_mix's ops; None: no per-request maps
        if static_mix:
            self.register_buffer("qk_mix", torch.zeros(num_kv_heads, head_dim, head_dim), persistent=False)
            self.register_buffer("qk_mix_q", torch.zeros(num_kv_heads, head_dim, head_dim), persistent=False)
        else:
            self.qk_mix = self.qk_mix_q = None

    @property
    def static_mix(self) -> bool:
        return self.qk_mix is not None

    def install(self, mix: torch.Tensor, mix_q: torch.Tensor) -> None:
        """Put M_h and M_h^{-T} [H_kv local, d, d] in place (from the enclave's DeviceMaterial)."""
        if not self.static_mix:
            raise ValueError("this layer has no static mix to install")
        if mix.shape != self.qk_mix.shape or mix_q.shape != self.qk_mix.shape:
            raise ValueError(f"mix {tuple(mix.shape)} / {tuple(mix_q.shape)} does not fit {tuple(self.qk_mix.shape)}")
        self.qk_mix.copy_(mix)
        self.qk_mix_q.copy_(mix_q)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.static_mix:
            query, key = mix_qk(query, key, self.qk_mix, self.qk_mix_q)
        if self.request_layer is None:
            return self.attn(query, key, value, **kwargs)
        query, key, value = torch.ops.kvshield.request_mix(query, key, value, self.request_layer, self.num_kv_heads)
        out = self.attn(query, key, value, **kwargs)
        return torch.ops.kvshield.request_unmix(out, self.request_layer, self.num_kv_heads)


def vllm_attention(attn: nn.Module) -> nn.Module:
    """vLLM's Attention layer of a self_attn.attn, wrapped or not (it holds kv_cache)."""
    return attn.attn if isinstance(attn, MixedAttention) else attn
