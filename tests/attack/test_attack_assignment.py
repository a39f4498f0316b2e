"""assignment.py: the minimum-cost assignment equals brute force."""

import itertools

import pytest
import torch

from vllm_kvshield.attack.assignment import assign


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_assignment_is_optimal(n):
    gen = torch.Generator().manual_seed(n)
    for _ in range(20):
        cost = torch.rand(n, n, generator=gen, dtype=torch.float64)
        col = assign(cost)
        assert sorted(col.tolist()) == list(range(n))
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert cost[torch.arange(n), col].sum() == pytest.approx(float(best), abs=1e-12)


def test_assignment_recovers_a_permutation():
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    values = torch.randn(64, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cost = (values[:, None] - values[perm][None]) ** 2  # row i matches column where values[perm] == values[i]
    assert torch.equal(assign(cost), torch.argsort(perm))


def test_non_square_is_refused():
    with pytest.raises(ValueError, match="square"):
        assign(torch.zeros(2, 3))
