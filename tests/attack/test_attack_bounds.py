"""The transforms' security bounds, asserted against literal numbers (never the module's own constants).

Every dense matrix: condition number <= 4 and no structural zeros; every K pair scale in
[1/2, 2] and spread over that range (a scale fixed at 1 would leave pair norms readable).
"""

import pytest
import torch

from vllm_kvshield import transforms as T

SHAPE = T.AttentionShape(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576)
KEY = bytes(range(32))
LAYERS = (0, 7, 29)


def pair_scales(k_mat: torch.Tensor) -> torch.Tensor:
    """c of each rotary slot: T = P . blockdiag(c R(phi)) has |det| of each 2x2 block = c^2. [H, d/2]"""
    d = k_mat.shape[-1]
    a, b = torch.arange(d // 2), torch.arange(d // 2) + d // 2
    cols = k_mat[:, :, a], k_mat[:, :, b]  # slot i's two output columns
    # each output column pair is one original pair times c R(phi): its two columns have norm c each
    return torch.stack((cols[0].norm(dim=1), cols[1].norm(dim=1))).mean(0)


@pytest.mark.parametrize("mode", ["mix-v", "mix"])
@pytest.mark.parametrize("layer", LAYERS)
def test_dense_matrices_are_well_conditioned_and_dense(mode, layer):
    lk = T.derive_layer_key(KEY, layer, SHAPE, mode)
    dense = {"v_mat": lk.v_mat, "v_inv": lk.v_inv}
    if mode == "mix":
        dense.update(mix=lk.mix, mix_q=lk.mix_q)
    for name, mats in dense.items():
        cond = torch.linalg.cond(mats)
        assert (cond <= 4.0 + 1e-9).all(), (name, cond)
        assert (cond >= 2.0).all(), (name, cond)  # non-orthogonal: norms are not kept
        assert (mats.abs() > 1e-9).all(), (name, int((mats.abs() <= 1e-9).sum()))  # no structural zeros
        assert (mats.abs() > 1e-3).float().mean() > 0.95, name  # and no near-zero pattern


@pytest.mark.parametrize("layer", LAYERS)
def test_pair_scales_are_in_half_to_two_and_spread(layer):
    lk = T.derive_layer_key(KEY, layer, SHAPE, "mix-v")
    c = pair_scales(lk.k_mat)
    assert (c >= 0.5 - 1e-9).all() and (c <= 2.0 + 1e-9).all(), c
    assert float(c.min()) < 0.6 and float(c.max()) > 1.6, c  # drawn over the whole range, not fixed
    assert float(c.log().std()) > 0.25, c
    q_scale = pair_scales(lk.q_mat)
    assert torch.allclose(q_scale * c, torch.ones_like(c)), "Q gets 1/c"


def test_permute_mode_is_a_permutation():
    lk = T.derive_layer_key(KEY, 0, SHAPE, "permute")
    for mats in (lk.k_mat, lk.v_mat):
        assert ((mats == 0) | (mats == 1)).all() and (mats.sum(-1) == 1).all() and (mats.sum(-2) == 1).all()
