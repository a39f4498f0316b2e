"""engine.py: the harness reads real blocks from real engines and refuses a shield that is silently off."""

import pytest

from vllm_kvshield.attack import engine


def test_plain_engine_caches_plain_layer0_kv(plain, public):
    """The decoded blocks of plain vLLM are the public model's layer-0 K (RoPE'd) and V: the decoder is right."""
    assert plain.status["enabled"] is False
    for req, obs in plain.requests:
        k_rel, v_rel = engine.plain_mismatch(public, obs, req.tokens)
        assert k_rel < engine.PLAIN_MATCH and v_rel < engine.PLAIN_MATCH, (k_rel, v_rel)
        engine.require_cache_state("none", (k_rel, v_rel))


def test_shielded_engine_caches_other_values(permuted, plain, public):
    """The permute engine reports its shield, and its blocks are far from plain ones for the same tokens."""
    assert permuted.status == {**permuted.status, "enabled": True, "mode": "permute"}
    for (req, obs), (_, plain_obs) in zip(permuted.requests, plain.requests):
        k_rel, v_rel = engine.plain_mismatch(public, obs, req.tokens)
        assert k_rel > 10 * engine.PLAIN_MATCH and v_rel > 10 * engine.PLAIN_MATCH, (k_rel, v_rel)
        assert not (obs.k == plain_obs.k).all() and not (obs.v == plain_obs.v).all()
        engine.require_cache_state("permute", (k_rel, v_rel))


def test_a_silently_off_shield_is_refused(plain, public):
    """Plain blocks offered as mode "permute", or a plain worker asked to be shielded, raise."""
    req, obs = plain.requests[0]
    with pytest.raises(engine.ShieldStateError, match="the shield is off"):
        engine.require_cache_state("permute", engine.plain_mismatch(public, obs, req.tokens))
    with pytest.raises(engine.ShieldStateError, match="mode 'mix' asked"):
        engine.require_shield(plain.llm, "mix")


def test_unknown_mode_is_refused_with_the_accepted_ones(model_path):
    with pytest.raises(ValueError, match="accepted: none, permute, mix-v, mix"):
        engine.open_engine(model_path, "shuffle", "float32")
