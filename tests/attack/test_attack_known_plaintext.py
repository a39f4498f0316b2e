"""Attack 4: fitting each transform family the shield allows, then undoing it (simulated and on real blocks)."""

import pytest
import torch

from vllm_kvshield import transforms as T
from vllm_kvshield.attack.known_plaintext import KnownPlaintext, fit_part
from vllm_kvshield.attack.observation import Observation
from vllm_kvshield.attack.stats import recovery_rate

KNOWN_COUNTS = (1, 4, 16, 64, 256)


def layer0_shape(public) -> T.AttentionShape:
    s = public.shape
    return T.AttentionShape(num_heads=s.heads, num_kv_heads=s.kv_heads, head_dim=s.head_dim, hidden_size=s.hidden)


def simulated(public, tokens: list[int], mode: str, key: bytes) -> Observation:
    """Layer-0 K/V of the tokens as mode `mode` with `key` caches them (transforms.py), in fp32."""
    ids = torch.tensor(tokens)
    positions = torch.arange(len(tokens))
    k = public.rotate(public.layer0_k[ids], positions).double()
    v = public.layer0_v[ids].double()
    lk = T.derive_layer_key(key, 0, layer0_shape(public), mode)
    k = torch.einsum("thd,hde->the", k[:, lk.kv_heads], lk.k_mat)
    if lk.mix is not None:
        k = torch.einsum("thd,hde->the", k, lk.mix)
    v = torch.einsum("thd,hde->the", v[:, lk.kv_heads], lk.v_mat)
    return Observation((0,), k[None].float(), v[None].float())


@pytest.mark.parametrize(
    "mode, n, k_family, v_family",
    [
        ("permute", 1, "permutation", "permutation"),
        ("mix-v", 4, "pair_similarity", None),
        ("mix-v", 256, "pair_similarity", "linear"),
        ("mix", 256, "linear", "linear"),
    ],
)
def test_the_most_constrained_family_that_fits_is_chosen(public, conversation, mode, n, k_family, v_family):
    """Each mode's transform is identified from n known tokens; too few tokens for a family accept nothing."""
    obs = simulated(public, conversation.tokens, mode, T.new_key())
    attack = KnownPlaintext(public)
    guesses = attack.recover(obs.with_known(conversation.tokens[:n]))
    for part, family in (("k", k_family), ("v", v_family)):
        fit = attack.last_fits[part]
        assert fit.accepted == (family is not None) and (family is None or fit.family == family), (part, fit.family, fit.residual)
    assert recovery_rate(guesses, conversation.tokens, conversation.private[-40:]) >= 0.99


def test_fit_part_undoes_a_dense_map_with_head_permutation(public, conversation):
    ids = torch.tensor(conversation.tokens[:200])
    plain = public.layer0_v[ids]  # [n, H, d]
    key = T.new_key()
    lk = T.derive_layer_key(key, 3, layer0_shape(public), "mix")
    seen = torch.einsum("thd,hde->the", plain[:, lk.kv_heads].double(), lk.v_mat).float()
    fit = fit_part(plain, seen)
    assert fit.accepted and fit.family == "linear"
    assert torch.equal(fit.heads, lk.kv_heads)
    assert torch.allclose(fit.apply(seen), plain, atol=1e-3 * plain.abs().max())


@pytest.mark.parametrize("observed", ["plain", "permuted"])
def test_known_plaintext_on_real_blocks(request, public, observed):
    """On plain and permute engines, one known token already identifies the transform (identity, permutation)."""
    req, obs = request.getfixturevalue(observed).conversation
    scored = [p for p in req.private if p >= max(KNOWN_COUNTS)]
    attack = KnownPlaintext(public)
    for n in KNOWN_COUNTS:
        guesses = attack.recover(obs.with_known(req.tokens[:n]))
        assert attack.last_fits["k"].family == attack.last_fits["v"].family == "permutation", n
        assert recovery_rate(guesses, req.tokens, scored) >= 0.99, n


def test_known_count_out_of_range_is_refused(public, conversation):
    obs = simulated(public, conversation.tokens[:10], "permute", T.new_key())
    with pytest.raises(ValueError, match="0 < known tokens < 10"):
        KnownPlaintext(public).recover(obs)
