"""stats.py: exact-match rates and bootstrap intervals."""

import pytest
import torch

from vllm_kvshield.attack.observation import NO_GUESS
from vllm_kvshield.attack.stats import recovery_rate, summarize


def test_rate_counts_exact_matches_on_the_given_positions_only():
    guesses = torch.tensor([5, 6, NO_GUESS, 8])
    assert recovery_rate(guesses, [5, 0, 7, 8], [1, 2, 3]) == pytest.approx(1 / 3)
    assert recovery_rate(guesses, [5, 0, 7, 8], [0]) == 1.0
    with pytest.raises(ValueError):
        recovery_rate(guesses, [5, 0, 7, 8], [])


def test_interval_brackets_the_mean_and_shrinks_with_more_requests():
    gen = torch.Generator().manual_seed(0)
    few = torch.rand(10, generator=gen).tolist()
    many = (torch.rand(200, generator=gen)).tolist()
    for rates in (few, many):
        mean, low, high = summarize(rates)
        assert low <= mean <= high
    assert summarize(many)[2] - summarize(many)[1] < summarize(few)[2] - summarize(few)[1]
    assert summarize([1.0, 1.0, 1.0]) == (1.0, 1.0, 1.0)
