"""MixedAttention alone, in front of a stand-in for vLLM's Attention (causal GQA attention that records its k).

Mode "mix" here; its per-request maps (request_mix's ops) run in tests/test_per_request*.py and
tests/test_model_families.py through the engine.
"""

import pytest
import torch
from torch import nn

from vllm_kvshield import transforms
from vllm_kvshield.mixed_attention import MixedAttention, vllm_attention

SHAPE = transforms.AttentionShape(num_heads=6, num_kv_heads=2, head_dim=32, hidden_size=96)


class CausalAttention(nn.Module):
    """q [T, H_q*d], k, v [T, H_kv*d] -> [T, H_q*d]; keeps the k it was given (what vLLM would cache)."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.h, self.h_kv, self.d = num_heads, num_kv_heads, head_dim
        self.cached_k = None

    def forward(self, q, k, v, output_shape=None):
        self.cached_k = k
        t, g = q.shape[0], self.h // self.h_kv
        qh = q.view(t, self.h, self.d).transpose(0, 1)
        kh = k.view(t, self.h_kv, self.d).transpose(0, 1).repeat_interleave(g, dim=0)
        vh = v.view(t, self.h_kv, self.d).transpose(0, 1).repeat_interleave(g, dim=0)
        out = torch.nn.functional.scaled_dot_product_attention(qh, kh, vh, is_causal=True).transpose(0, 1)
        return out.reshape(t, -1) if output_shape is None else out.reshape(output_shape)


def test_output_unchanged_and_k_mixed():
    lk = transforms.derive_layer_key(bytes(range(32)), 0, SHAPE, "mix")
    g = torch.Generator().manual_seed(0)
    t, d = 20, SHAPE.head_dim
    q = torch.randn(t, SHAPE.num_heads * d, generator=g)
    k, v = (torch.randn(t, SHAPE.num_kv_heads * d, generator=g) for _ in range(2))
    plain = CausalAttention(SHAPE.num_heads, SHAPE.num_kv_heads, d)
    want = plain(q, k, v)

    mixed = MixedAttention(CausalAttention(SHAPE.num_heads, SHAPE.num_kv_heads, d), SHAPE.num_kv_heads, d, static_mix=True)
    mixed.install(lk.mix.float(), lk.mix_q.float())
    got = mixed(q, k, v, output_shape=(t, SHAPE.num_heads * d))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    cached = vllm_attention(mixed).cached_k.view(t, SHAPE.num_kv_heads, d).double()
    torch.testing.assert_close(cached, torch.einsum("thd,hde->the", k.view(t, -1, d).double(), lk.mix), rtol=1e-5, atol=1e-5)
    assert vllm_attention(plain) is plain


def test_install_refuses_a_wrong_shape():
    mixed = MixedAttention(CausalAttention(6, 2, 32), 2, 32, static_mix=True)
    with pytest.raises(ValueError, match=r"does not fit \(2, 32, 32\)"):
        mixed.install(torch.zeros(1, 32, 32), torch.zeros(1, 32, 32))
    per_request_only = MixedAttention(CausalAttention(6, 2, 32), 2, 32, static_mix=False, request_layer=0)
    with pytest.raises(ValueError, match="no static mix"):
        per_request_only.install(torch.zeros(2, 32, 32), torch.zeros(2, 32, 32))
