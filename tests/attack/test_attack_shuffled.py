"""Attacks without positions, on a simulation of the per-request mode over plain vLLM's real cached K/V.

per_request_sim.py draws what CONTEXT.md's design draws (fresh dense U diag(s) W per KV head
on K after RoPE and on V, cond <= 4, over mix-v's static maps; rows shuffled per KV head
inside blocks). The attacks must honour the layout: they find rows by what survives
(equal V rows, a whole known block's row-space signature) and place them by RoPE.

The template, chosen-plaintext and shuffle-off cases run on the real per-request engine
(test_attack_claims.py); what stays here is what the engine tests do not cover cheaply.
"""

import pytest
import torch

from per_request_sim import mix_v_over, per_request_cache
from vllm_kvshield.attack.bootstrap import Bootstrap
from vllm_kvshield.attack.known_plaintext import KnownPlaintext
from vllm_kvshield.attack.rowmatch import match_known_rows
from vllm_kvshield.attack.stats import recovery_rate


def per_request(public, obs, seed: int, shuffle: bool = True, block_size: int = 128):
    """A plain engine's observation as the per-request mode would cache it (one fresh key, seeded)."""
    k, v = mix_v_over(public, *obs.at(0))
    return per_request_cache(k, v, torch.Generator().manual_seed(seed), block_size, shuffle)


def test_a_shuffled_layout_refuses_positions(plain, public):
    req, obs = plain.requests[0]
    shuffled = per_request(public, obs, 0)
    with pytest.raises(ValueError, match="shuffled"):
        shuffled.positions
    with pytest.raises(ValueError, match="shuffled"):
        KnownPlaintext(public).recover(shuffled.with_known(req.tokens[:8]))


def test_equal_tokens_stay_equal_rows_and_are_found(plain, public):
    """Within one request, every occurrence of a token is the same V row, whatever the per-request map."""
    req, obs = plain.requests[0]
    shuffled = per_request(public, obs, 1)
    known = dict(enumerate(req.tokens))
    matched = match_known_rows(shuffled.at(0)[1], known, shuffled.layout.blocks(shuffled.length), public.layer0_v)
    counts = {t: req.tokens.count(t) for t in set(req.tokens)}
    most = max(counts, key=counts.get)
    for head in matched:  # the most repeated token's rows are found in every head, all of them
        assert sum(1 for t, _ in head.values() if t == most) == counts[most], (most, counts[most])


def test_known_prefix_needs_a_whole_block(plain, public):
    """The victim's own first n tokens: less than a block known reveals nothing; a whole block (> d rows: its
    row-space signature places every row) reveals the request's key, and the rest of the request."""
    req, obs = plain.conversation
    block = 128  # vLLM's CPU block size (with 80 rows, barely more than d = 64, the signatures do not separate)
    shuffled = per_request(public, obs, 3, block_size=block)
    scored = [p for p in req.private if p >= block]
    attack = Bootstrap(public)
    short = recovery_rate(attack.recover(shuffled.with_known(req.tokens[: block - 16])), req.tokens, scored)
    whole = recovery_rate(attack.recover(shuffled.with_known(req.tokens[:block])), req.tokens, scored)
    assert short <= 0.01, short
    assert whole >= 0.90, whole
