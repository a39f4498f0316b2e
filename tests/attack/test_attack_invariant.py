"""Attack 2 on real cache blocks: sorted values / pair norms see through mode permute."""

import pytest

from vllm_kvshield.attack.direct import DirectInversion
from vllm_kvshield.attack.invariant import PermutationInvariant

from attack_helpers import mean_rate


@pytest.mark.parametrize("part", ["k", "v"])
def test_invariant_features_recover_plain_vllm(plain, public, part):
    assert mean_rate(PermutationInvariant(public, part), plain) >= 0.99


@pytest.mark.parametrize("part", ["k", "v"])
def test_invariant_features_beat_permute(permuted, public, part):
    """Most tokens come back through the permutation, where the direct attack gets none."""
    invariant = mean_rate(PermutationInvariant(public, part), permuted)
    assert invariant >= 0.9
    assert invariant > mean_rate(DirectInversion(public, part), permuted) + 0.5
