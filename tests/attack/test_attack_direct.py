"""Attack 1 on real cache blocks: plain vLLM's layer-0 K and V give every token back; permute hides them."""

import pytest

from vllm_kvshield.attack.direct import DirectInversion

from attack_helpers import mean_rate


@pytest.mark.parametrize("part", ["k", "v"])
def test_direct_inversion_recovers_plain_vllm(plain, public, part):
    assert mean_rate(DirectInversion(public, part), plain) >= 0.99


@pytest.mark.parametrize("part", ["k", "v"])
def test_direct_inversion_fails_on_permute(permuted, public, part):
    assert mean_rate(DirectInversion(public, part), permuted) < 0.05


def test_unknown_part_is_refused(public):
    with pytest.raises(ValueError, match="accepted: k, v"):
        DirectInversion(public, "q")
