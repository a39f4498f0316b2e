"""Within one request, K rows of one token relate by a conjugated RoPE rotation: the equations it gives.

On a simulated per-request K (the public model's layer-0 K of public text, RoPE, a fresh dense
map, bf16): the forms M^-1 D M^-T (D constant per rotary pair) solve every equation, other
forms do not; and a request of a few hundred tokens leaves almost every direction free (the
attack needs about d/2 = 32), as the README states.
"""

import torch

from per_request_sim import _dense
from vllm_kvshield import data
from vllm_kvshield.attack.rotation_invariants import equations, invariant_forms

TOKENS = 256


def simulated(public, seed: int):
    ids = torch.tensor(public.tokenizer.encode(data.text("alice"), add_special_tokens=False)[:TOKENS])
    m = _dense(public.shape.head_dim, torch.Generator().manual_seed(seed))
    k = (public.rotate(public.layer0_k[ids], torch.arange(TOKENS))[:, 0].double() @ m).bfloat16().double()
    groups: dict[int, list[int]] = {}
    for row, t in enumerate(ids.tolist()):
        groups.setdefault(t, []).append(row)
    return k, [g for g in groups.values() if len(g) > 1], m


def residual(a: torch.Tensor, form: torch.Tensor) -> float:
    d = form.shape[0]
    i, j = torch.triu_indices(d, d)
    return float((a @ form[i, j]).norm() / (a.norm() * form[i, j].norm()))


def test_pair_constant_forms_solve_the_equations_and_others_do_not(public):
    k, groups, m = simulated(public, 0)
    a = equations(k, groups)
    d = m.shape[0]
    pair_scale = torch.rand(d // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    inv = torch.linalg.inv(m)
    invariant = inv @ torch.diag(pair_scale.repeat(2)) @ inv.T  # RoPE pairs dims (i, i + d/2)
    other = torch.randn(d, d, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert residual(a, invariant) < 1e-3, residual(a, invariant)
    assert residual(a, other + other.T) > 1e-2, residual(a, other + other.T)


def test_a_short_request_leaves_the_map_free(public):
    """256 tokens of English: under 100 repeated rows, about 2000 of the 2080 form directions still free."""
    k, groups, _ = simulated(public, 3)
    found = invariant_forms(k, groups)
    assert found.equations < 150 and found.null_dimension > 1900, (found.equations, found.null_dimension)
    assert not found.determined
