"""Attack 3 on real cache blocks: centred log pair norms with a public-text prior."""

import torch

from vllm_kvshield.attack.moments import CentredPairNorms
from vllm_kvshield.attack.prior import public_prior

from attack_helpers import mean_rate


def test_centred_pair_norms_recover_plain_vllm(plain, public):
    prior = public_prior(public.tokenizer, public.shape.vocab)
    assert mean_rate(CentredPairNorms(public, prior), plain) >= 0.99


def test_centred_pair_norms_ignore_permutation(permuted, public):
    """Permutations move pair norms, never change them: the same tokens come back."""
    prior = public_prior(public.tokenizer, public.shape.vocab)
    assert mean_rate(CentredPairNorms(public, prior), permuted) >= 0.99


def test_prior_is_a_distribution_of_public_text(public):
    prior = public_prior(public.tokenizer, public.shape.vocab)
    assert prior.shape == (public.shape.vocab,) and torch.isclose(prior.sum(), torch.tensor(1.0))
    the = public.tokenizer.encode(" the", add_special_tokens=False)[0]
    assert prior[the] > 100 * prior.median()
