"""transforms.py alone: attention outputs and cached K/V under every mode (fp32, random configs).

The reference attention is Llama's (Mistral's and Qwen2's are the same computation; Qwen2 adds
q/k/v biases) or, for shapes with qk_norm, Qwen3's: a per-head RMSNorm on q and k before RoPE.
"""

import dataclasses
import math
import subprocess
import sys

import pytest
import torch

from vllm_kvshield import transforms as T

CONFIGS = {
    "mha-d64": T.AttentionShape(num_heads=4, num_kv_heads=4, head_dim=64, hidden_size=192),
    "gqa-d64": T.AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=144),
    "gqa-d128": T.AttentionShape(num_heads=8, num_kv_heads=2, head_dim=128, hidden_size=256),
    "mqa-d128-gptj": T.AttentionShape(num_heads=4, num_kv_heads=1, head_dim=128, hidden_size=128, neox=False),
    "qknorm-gqa-d64": T.AttentionShape(num_heads=8, num_kv_heads=2, head_dim=64, hidden_size=192, qk_norm=True),
    "qknorm-mha-d128": T.AttentionShape(num_heads=2, num_kv_heads=2, head_dim=128, hidden_size=128, qk_norm=True),
}
QK_NORM = [name for name, shape in CONFIGS.items() if shape.qk_norm]
NORM_EPS = 1e-6


def inv_freq(d: int, scaling: str | None) -> torch.Tensor:
    """RoPE frequencies, optionally with llama3 or linear scaling (as in vLLM's rotary classes)."""
    f = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if scaling == "linear":
        return f / 4.0
    if scaling == "llama3":  # factor 8, low 1, high 4, original context 64
        wavelen = 2 * math.pi / f
        smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
        mid = (1 - smooth) * f / 8.0 + smooth * f
        return torch.where(wavelen > 64, f / 8.0, torch.where(wavelen < 16, f, mid))
    return f


def rotary_cache(d: int, positions: int, scaling: str | None) -> torch.Tensor:
    freqs = torch.arange(positions, dtype=torch.float64)[:, None] * inv_freq(d, scaling)[None]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).float()  # vLLM's [P, d] layout


def rope(x: torch.Tensor, cache: torch.Tensor, d: int, neox: bool) -> torch.Tensor:
    """x: [T, H*d] rotated per position as vLLM's ApplyRotaryEmb does."""
    t = x.shape[0]
    x = x.view(t, -1, d)
    cos, sin = cache[:t].chunk(2, dim=-1)  # [T, d/2]
    a, b = T.pair_dims(d, neox)
    xa, xb = x[..., a], x[..., b]
    out = torch.empty_like(x)
    out[..., a] = xa * cos[:, None] - xb * sin[:, None]
    out[..., b] = xb * cos[:, None] + xa * sin[:, None]
    return out.reshape(t, -1)


def head_norm(x: torch.Tensor, weight: torch.Tensor, d: int) -> torch.Tensor:
    """Qwen3's q_norm / k_norm: RMSNorm over each head's d dims, one weight [d] for all heads."""
    h = x.view(x.shape[0], -1, d)
    return (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + NORM_EPS) * weight).reshape(x.shape)


def attention(x, w, shape, cache, mix=None):
    """One attention block (Llama's; Qwen3's with shape.qk_norm); returns output and the cached (k, v) as [T, H_kv, d]."""
    d, g = shape.head_dim, shape.group
    lin = lambda n: x @ w[f"{n}.weight"].T + w.get(f"{n}.bias", 0.0)  # noqa: E731
    q, k, v = lin("q_proj"), lin("k_proj"), lin("v_proj")
    if shape.qk_norm:
        q, k = head_norm(q, w["q_norm.weight"], d), head_norm(k, w["k_norm.weight"], d)
    q, k = rope(q, cache, d, shape.neox), rope(k, cache, d, shape.neox)
    if mix is not None:
        q, k = T.mix_qk(q, k, *mix)
    t = x.shape[0]
    qh = q.view(t, shape.num_kv_heads, g, d)
    kh, vh = k.view(t, shape.num_kv_heads, d), v.view(t, shape.num_kv_heads, d)
    scores = torch.einsum("qhgd,khd->hgqk", qh, kh) / math.sqrt(d)
    scores = scores.masked_fill(torch.triu(torch.ones(t, t, dtype=torch.bool), 1), float("-inf"))
    o = torch.einsum("hgqk,khd->qhgd", scores.softmax(-1), vh).reshape(t, -1)
    return o @ w["o_proj.weight"].T + w.get("o_proj.bias", 0.0), kh, vh


def random_layer(shape, bias: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    hq, hkv, D = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim, shape.hidden_size
    w = {
        "q_proj.weight": torch.randn(hq, D, generator=g) / math.sqrt(D),
        "k_proj.weight": torch.randn(hkv, D, generator=g) / math.sqrt(D),
        "v_proj.weight": torch.randn(hkv, D, generator=g) / math.sqrt(D),
        "o_proj.weight": torch.randn(D, hq, generator=g) / math.sqrt(hq),
    }
    if bias:
        for n, size in (("q_proj", hq), ("k_proj", hkv), ("v_proj", hkv), ("o_proj", D)):
            w[f"{n}.bias"] = torch.randn(size, generator=g) * 0.1
    if shape.qk_norm:  # log-normal, different per dim: a misplaced weight changes the output
        for n in T.QK_NORM_WEIGHTS:
            w[n] = torch.exp(0.5 * torch.randn(shape.head_dim, generator=g))
    x = torch.randn(24, D, generator=g)
    return w, x


def shielded(x, w, shape, cache, mode, layer, key=None):
    """The layer's attention after shield_layer: its output, cached (k, v), and the material."""
    new_w, dev = T.shield_layer(key or KEY, layer, shape, mode, w, torch.float32)
    mix = None if dev.mix is None else (dev.mix, dev.mix_q)
    return (*attention(x, new_w, shape, T.shielded_rotary_cache(cache, dev), mix), new_w, dev)


KEY = bytes(range(32))


@pytest.mark.parametrize("mode", T.MODES)
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("scaling", [None, "linear", "llama3"], ids=["rope", "linear", "llama3"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_attention_output_unchanged(config, scaling, bias, mode):
    shape = CONFIGS[config]
    w, x = random_layer(shape, bias)
    cache = rotary_cache(shape.head_dim, 32, scaling)
    plain, k, v = attention(x, w, shape, cache)

    out, k2, v2, _, _ = shielded(x, w, shape, cache, mode, layer=3)

    torch.testing.assert_close(out, plain, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(k2, k, atol=1e-3), "K cache was not transformed"
    assert not torch.allclose(v2, v, atol=1e-3), "V cache was not transformed"


@pytest.mark.parametrize("mode", T.MODES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_cached_kv_predicted_from_key(config, mode):
    """The cached K/V equal the plain ones under the material derived from the key."""
    shape = CONFIGS[config]
    w, x = random_layer(shape, bias=True)
    cache = rotary_cache(shape.head_dim, 32, None)
    _, k, v = attention(x, w, shape, cache)
    _, k2, v2, _, _ = shielded(x, w, shape, cache, mode, layer=5)

    want_k, want_v = T.predict_cached_kv(k, v, T.derive_layer_key(KEY, 5, shape, mode))
    torch.testing.assert_close(k2, want_k, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(v2, want_v, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_permute_is_exact_permutation(config):
    """permute moves values without changing them: the cache holds the plain bits, reordered."""
    shape = CONFIGS[config]
    w, x = random_layer(shape, bias=False)
    cache = rotary_cache(shape.head_dim, 32, None)
    _, k, v = attention(x, w, shape, cache)
    _, k2, v2, new_w, _ = shielded(x, w, shape, cache, "permute", layer=0)
    torch.testing.assert_close(k2.sort(-1).values.sort(1).values, k.sort(-1).values.sort(1).values)
    torch.testing.assert_close(v2.sort(-1).values.sort(1).values, v.sort(-1).values.sort(1).values)
    names = ("q_proj.weight", "k_proj.weight", "v_proj.weight") + (T.QK_NORM_WEIGHTS if shape.qk_norm else ())
    for name in names:
        assert torch.equal(new_w[name].flatten().sort().values, w[name].flatten().sort().values), name


def test_rope_needs_the_permuted_table():
    """Permuting pairs without permuting the table breaks attention (the published bug)."""
    shape = CONFIGS["gqa-d64"]
    w, x = random_layer(shape, bias=False)
    cache = rotary_cache(shape.head_dim, 32, None)
    plain, _, _ = attention(x, w, shape, cache)
    new_w, _ = T.shield_layer(KEY, 0, shape, "permute", w, torch.float32)
    wrong, _, _ = attention(x, new_w, shape, cache)
    assert (wrong - plain).abs().max() > 1e-2


# --- q/k norm (Qwen3): what passes the norm, and what must move behind it -----------------------


def plain_and_weights(config: str):
    shape = CONFIGS[config]
    w, x = random_layer(shape, bias=True)
    cache = rotary_cache(shape.head_dim, 32, None)
    return shape, w, x, cache, attention(x, w, shape, cache)[0]


@pytest.mark.parametrize("config", QK_NORM)
def test_qk_norm_needs_its_own_transform(config):
    """The Llama transform (per-head c R(phi) on W_K's rows) does not pass a shared RMSNorm weight."""
    shape, w, x, cache, plain = plain_and_weights(config)
    as_llama = T.AttentionShape(shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.hidden_size)
    lk = T.derive_layer_key(KEY, 2, as_llama, "mix-v")
    proj = {n: t for n, t in w.items() if not n.endswith("_norm.weight")}
    new_w = T.transform_attention(proj, lk, as_llama, torch.float32)
    # norm weights permuted as the pairs are: the best a per-head transform of the rows could hope for
    new_w.update(T.transform_qk_norm(w["q_norm.weight"], w["k_norm.weight"], lk, shape))
    wrong, _, _ = attention(x, new_w, shape, T.permute_rotary_cache(cache, lk.pairs))
    assert (wrong - plain).abs().max() > 1e-2


@pytest.mark.parametrize("part", ["norm weights", "norm scale"])
@pytest.mark.parametrize("config", QK_NORM)
def test_qk_norm_each_part_is_needed(config, part):
    """Leave out the norm weights' permutation, or q_norm's 1/c (mix-v), and attention changes.

    (The rotary turn needs no counterpart: q and k turn alike. test_cached_kv_predicted_from_key
    shows it is in the cache.)
    """
    shape, w, x, cache, plain = plain_and_weights(config)
    new_w, dev = T.shield_layer(KEY, 4, shape, "mix-v", w, torch.float32)
    table = T.shielded_rotary_cache(cache, dev)
    if part == "norm weights":
        new_w = {**new_w, **{n: w[n] for n in T.QK_NORM_WEIGHTS}}
    else:  # k_norm scaled by c, q_norm not by 1/c
        lk = dataclasses.replace(T.derive_layer_key(KEY, 4, shape, "mix-v"), norm_scale=None)
        new_w["q_norm.weight"] = T.transform_qk_norm(w["q_norm.weight"], w["k_norm.weight"], lk, shape)["q_norm.weight"]
    wrong, _, _ = attention(x, new_w, shape, table)
    assert (wrong - plain).abs().max() > 1e-2, part


@pytest.mark.parametrize("config", QK_NORM)
def test_qk_norm_mix_v_scales_k_pairs(config):
    """mix-v with a q/k norm is more than a permutation: cached K's rotary-pair norms are scaled.

    A pair permutation alone keeps each head's multiset of pair norms, which attack 2 matches.
    """
    shape, w, x, cache, _ = plain_and_weights(config)
    _, k, _ = attention(x, w, shape, cache)
    _, k2, _, _, _ = shielded(x, w, shape, cache, "mix-v", layer=1)
    a, b = T.pair_dims(shape.head_dim, shape.neox)
    norms = lambda t: (t[..., a] ** 2 + t[..., b] ** 2).sqrt().sort(-1).values.sort(1).values  # noqa: E731
    assert not torch.allclose(norms(k2), norms(k), rtol=1e-2), "mix-v K pair norms are only permuted"
    _, k3, _, _, _ = shielded(x, w, shape, cache, "permute", layer=1)
    torch.testing.assert_close(norms(k3), norms(k), rtol=1e-5, atol=1e-5)


def test_material_is_deterministic_and_key_dependent():
    shape = CONFIGS["gqa-d128"]
    a = T.derive_layer_key(KEY, 1, shape, "mix")
    b = T.derive_layer_key(KEY, 1, shape, "mix")
    c = T.derive_layer_key(KEY, 2, shape, "mix")
    d = T.derive_layer_key(bytes(32), 1, shape, "mix")
    for name in ("pairs", "k_mat", "v_mat", "mix"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert not torch.equal(getattr(a, name), getattr(c, name)), name
        assert not torch.equal(getattr(a, name), getattr(d, name)), name


def test_haar_orthogonal_matrices_are_orthogonal_and_haar():
    """Built from Householder reflectors of Gaussian columns (Stewart), as distributed as QR of a Gaussian with signs
    fixed: on O(4), E tr = 0, E tr^2 = 1, E tr^4 = 3, det +1 and -1 equally often, E q_ij^2 = 1/4 (Haar moments),
    for the new sampler and the QR it replaces. Bounds are 6-7 standard errors of 40,000 samples."""
    x = torch.randn(40_000, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    q, r = torch.linalg.qr(x)
    by_qr = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    for sample in (T.haar_orthogonal(x), by_qr):
        torch.testing.assert_close(sample @ sample.mT, torch.eye(4, dtype=torch.float64).expand_as(sample), atol=1e-12, rtol=0)
        tr = torch.diagonal(sample, dim1=-2, dim2=-1).sum(-1)
        moments = [tr.mean(), (tr**2).mean(), (tr**4).mean(), torch.linalg.det(sample).mean(), (sample**2).mean()]
        assert all(abs(m - want) < bound for m, want, bound in zip(moments, [0, 1, 3, 0, 0.25], [0.03, 0.05, 0.3, 0.03, 0.002])), moments
    big = T.haar_orthogonal(torch.randn(8, 64, 64))  # the enclave's size and dtype
    torch.testing.assert_close(big @ big.mT, torch.eye(64).expand_as(big), atol=1e-5, rtol=0)


def test_dense_matrices_are_bounded_and_not_orthogonal():
    shape = CONFIGS["gqa-d128"]
    lk = T.derive_layer_key(KEY, 0, shape, "mix")
    for m, inv in ((lk.v_mat, lk.v_inv), (lk.mix, lk.mix_q.transpose(-1, -2))):
        cond = torch.linalg.cond(m)
        assert (cond <= T.DENSE_COND * (1 + 1e-9)).all(), cond
        assert (cond > 1.5).all(), f"too close to orthogonal: {cond}"
        torch.testing.assert_close(m @ inv, torch.eye(128, dtype=torch.float64).expand_as(m))


def test_bad_inputs_name_the_problem():
    shape = CONFIGS["gqa-d64"]
    w, _ = random_layer(shape, bias=False)
    with pytest.raises(ValueError, match="unknown mode 'rot13'; accepted: permute, mix-v, mix"):
        T.derive_layer_key(KEY, 0, shape, "rot13")
    with pytest.raises(ValueError, match="key must be 32 bytes"):
        T.derive_layer_key(b"short", 0, shape, "mix")
    bad = dict(w, **{"k_proj.weight": w["k_proj.weight"][:-1]})
    with pytest.raises(ValueError, match=r"k_proj.weight has shape \(191, 144\), expected \(192, 144\)"):
        T.shield_layer(KEY, 0, shape, "permute", bad, torch.float32)
    with pytest.raises(ValueError, match="attention weights missing: o_proj.weight"):
        T.shield_layer(KEY, 0, shape, "permute", {k: v for k, v in w.items() if k != "o_proj.weight"}, torch.float32)
    with pytest.raises(ValueError, match="unexpected attention tensor 'k_norm.weight'"):
        T.shield_layer(KEY, 0, shape, "permute", {**w, "k_norm.weight": torch.ones(64)}, torch.float32)
    qk_shape = CONFIGS["qknorm-gqa-d64"]
    qk_w, _ = random_layer(qk_shape, bias=False)
    no_norms = {k: v for k, v in qk_w.items() if not k.endswith("_norm.weight")}
    with pytest.raises(ValueError, match="attention weights missing: q_norm.weight, k_norm.weight"):
        T.shield_layer(KEY, 0, qk_shape, "mix", no_norms, torch.float32)


def test_material_repr_holds_no_numbers():
    lk = T.derive_layer_key(KEY, 0, CONFIGS["gqa-d64"], "mix")
    assert repr(lk) == "LayerKey(H_kv=3, d=64, mix=True)"


def test_imports_only_torch():
    code = "import sys, vllm_kvshield.transforms; print(sorted(m for m in ('vllm', 'ray', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
