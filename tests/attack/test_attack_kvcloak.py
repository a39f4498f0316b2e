"""Attack 5 (KV-Cloak's inversion and collision) on real cache blocks."""

import torch

from vllm_kvshield.attack.direct import DirectInversion
from vllm_kvshield.attack.kvcloak import KVCloakCollision, KVCloakInversion, calibrate_threshold
from vllm_kvshield.attack.llama_forward import LlamaForward
from vllm_kvshield.attack.requests import chat_request
from vllm_kvshield.attack.runner import calibration_text
from vllm_kvshield.attack.stats import recovery_rate

from attack_helpers import DEEP_LAYER, mean_rate


def test_inversion_recovers_plain_vllm(plain, public):
    assert mean_rate(KVCloakInversion(public), plain) >= 0.99


def test_inversion_fails_on_permute(permuted, public):
    assert mean_rate(KVCloakInversion(public), permuted) < 0.05


def calibrated(public, features: str, dtype) -> dict:
    req = chat_request(public.tokenizer, [calibration_text()])
    return calibrate_threshold(public, req.tokens, req.private[0], DEEP_LAYER, features, dtype)


def test_calibration_separates_true_from_wrong_candidates(public):
    cal = calibrated(public, "raw", torch.bfloat16)
    assert cal["largest_true_distance"] < cal["threshold"] < cal["smallest_wrong_distance"], cal


def test_collision_at_a_deep_layer(plain, permuted, public):
    """Layer 15 of a plain engine: most of a request comes back token by token; on permute, raw features find nothing,
    the permutation-invariant ones still find most tokens (fewer than raw ones on plain vLLM: sorting drops information)."""
    forward = LlamaForward(public)
    req, plain_obs = plain.requests[0]
    _, permuted_obs = permuted.requests[0]
    found = {}
    for name, obs, features in (("plain", plain_obs, "raw"), ("permute raw", permuted_obs, "raw"), ("permute invariant", permuted_obs, "invariant")):
        attack = KVCloakCollision(forward, DEEP_LAYER, calibrated(public, features, torch.bfloat16)["threshold"], features)
        found[name] = recovery_rate(attack.recover(obs.with_known(req.header)), req.tokens, req.private)
    assert found["plain"] >= 0.5, found
    assert found["permute raw"] <= 0.05, found
    assert found["permute invariant"] >= 0.5, found
    direct = recovery_rate(DirectInversion(public, "v").recover(plain_obs), req.tokens, req.private)
    assert found["plain"] <= direct  # the shortlist limits it; layer 0 gives everything
