"""The README's security claims, per mode, on the real engine (bf16, the real SmolLM2): each claim is a test.

On plain vLLM every layer-0 attack recovers >= 99%: an attack that cannot break plain vLLM
proves nothing. Per shielded mode, the attacks the README says it resists recover <= 1%,
the ones it says it does not resist >= 90%. Weakening a transform turns a test red (e.g.
mix-v's pair scale fixed at 1 leaves pair norms readable: mix-v / invariant_k fails).

The prompts are the tests' own (short, private-looking); the attacker's own requests are
public text (requests.attacker_requests). One engine per mode, from the session pool.
"""

import functools

import pytest
import torch

from vllm_kvshield.attack import engine
from vllm_kvshield.attack.chosen_plaintext import ChosenPlaintext
from vllm_kvshield.attack.direct import DirectInversion
from vllm_kvshield.attack.frequency import EqualityFrequency
from vllm_kvshield.attack.invariant import PermutationInvariant
from vllm_kvshield.attack.kvcloak import KVCloakInversion
from vllm_kvshield.attack.moments import CentredPairNorms
from vllm_kvshield.attack.prior import public_prior
from vllm_kvshield.attack.requests import attacker_requests, single_requests
from vllm_kvshield.attack.stats import recovery_rate
from vllm_kvshield.attack.template import TemplateBootstrap

PROMPTS = [
    "My name is Odile Farquharson and my bank PIN is 4471. Please remind me to call Dr. Ibsen on Tuesday about my blood test.",
    "I live at 9 Quarry Lane, Penrith CA11 7QB with my partner Kwame; write a note to our neighbour about the fence.",
    "Draft an email to my manager Yuki Tanabe saying my sick leave for the migraine starts on 3 May.",
]
OWN_REQUESTS = 2
BREAKS, RESISTS, GUESSES = "breaks", "resists", "guesses"
GUESS_LEVEL = 0.10  # what decoding every row as one frequent token ("." or " the") recovers on these prompts
CIPHERTEXT = ("direct_k", "direct_v", "invariant_k", "invariant_v", "centred_pair_norms", "kvcloak_inversion")
KNOWING = ("template_1", "chosen_plaintext", "equality_frequency")

# What the README claims: mode -> attack -> breaks (>= 90% recovered), resists (<= 1%), or guesses (<= GUESS_LEVEL:
# mix-v's K pair norms, scaled per pair, decode most rows to a few frequent tokens, 2-9% here depending on the key)
CLAIMS = {
    "none": {a: BREAKS for a in CIPHERTEXT + KNOWING},
    "permute": {
        "direct_k": RESISTS, "direct_v": RESISTS, "invariant_k": BREAKS, "invariant_v": BREAKS,
        "centred_pair_norms": BREAKS, "kvcloak_inversion": RESISTS, "template_1": BREAKS, "chosen_plaintext": BREAKS,
    },
    "mix-v": {
        "direct_k": RESISTS, "direct_v": RESISTS, "invariant_k": GUESSES, "invariant_v": RESISTS,
        "centred_pair_norms": BREAKS, "kvcloak_inversion": RESISTS, "template_1": BREAKS, "chosen_plaintext": BREAKS,
    },
    "mix": {**{a: RESISTS for a in CIPHERTEXT}, "template_1": BREAKS, "chosen_plaintext": BREAKS},
}  # fmt: skip
CLAIMS["per-request"] = {a: RESISTS for a in CIPHERTEXT + KNOWING}  # per-request keys, rows shuffled in blocks
CASES = [(m, a) for m, claims in CLAIMS.items() for a in claims]


@pytest.fixture(scope="session")
def claim_rates(engines, public):
    """mode -> attack -> mean recovery over the victims, computed on first use."""
    victims = single_requests(public.tokenizer, PROMPTS)
    own = attacker_requests(public.tokenizer, OWN_REQUESTS)
    prior = public_prior(public.tokenizer, public.shape.vocab)
    ciphertext = {
        "direct_k": DirectInversion(public, "k"), "direct_v": DirectInversion(public, "v"),
        "invariant_k": PermutationInvariant(public, "k"), "invariant_v": PermutationInvariant(public, "v"),
        "centred_pair_norms": CentredPairNorms(public, prior), "kvcloak_inversion": KVCloakInversion(public),
    }  # fmt: skip

    @functools.cache
    def observed(mode):
        llm = engines.get(mode, "bfloat16")
        engine.require_shield(llm, mode)
        layout = engine.layout_of(llm, mode)
        seen = [engine.observe(llm, r.tokens, (0,), layout) for r in victims]
        mine = [engine.observe(llm, r.tokens, (0,), layout).with_known(r.tokens) for r in own]
        return seen, mine

    def mean(guesses) -> float:
        return sum(recovery_rate(g, r.tokens, r.private) for g, r in zip(guesses, victims)) / len(guesses)

    @functools.cache
    def rate(mode, attack):
        seen, mine = observed(mode)
        if attack in ciphertext:
            return mean([ciphertext[attack].recover(o) for o in seen])
        if attack == "template_1":  # one request observed, the slow part: the first victim only
            return recovery_rate(TemplateBootstrap(public).recover(seen[0]), victims[0].tokens, victims[0].private)
        if attack == "chosen_plaintext":
            return mean(ChosenPlaintext(public).recover_pool(seen, mine))
        if attack == "equality_frequency":
            return mean(EqualityFrequency(public, prior).recover_pool(seen))
        raise AssertionError(attack)

    return rate


@pytest.mark.parametrize("mode, attack", CASES, ids=[f"{m}-{a}" for m, a in CASES])
def test_claim(claim_rates, mode, attack):
    recovered = claim_rates(mode, attack)
    if mode == "none":
        assert recovered >= 0.99, f"{attack} recovers only {recovered:.1%} of plain vLLM's cache: it proves nothing"
    elif CLAIMS[mode][attack] == RESISTS:
        assert recovered <= 0.01, f"{mode} is claimed to resist {attack}, which recovers {recovered:.1%}"
    elif CLAIMS[mode][attack] == GUESSES:
        assert recovered <= GUESS_LEVEL, f"{mode} is claimed to leave {attack} at guessing, which recovers {recovered:.1%}"
    else:
        assert recovered >= 0.90, f"{mode} is claimed not to resist {attack}, which recovers only {recovered:.1%}"


def test_engines_without_a_key_file_draw_different_keys(engines, public):
    """Two engines started without a key file: different key fingerprints, different cached blocks.

    mix-v and mix derive V's dense map from the key the same way, so under one key their
    cached layer-0 V would be equal (up to bf16); under two fresh keys they are far apart.
    """
    a, b = engines.get("mix-v", "bfloat16"), engines.get("mix", "bfloat16")
    fa, fb = engine.key_fingerprint(a), engine.key_fingerprint(b)
    assert fa and fb and fa != fb, (fa, fb)
    req = single_requests(public.tokenizer, PROMPTS[:1])[0]
    va = engine.observe(a, req.tokens, (0,), engine.layout_of(a, "mix-v")).at(0)[1]
    vb = engine.observe(b, req.tokens, (0,), engine.layout_of(b, "mix")).at(0)[1]
    assert float((va - vb).norm() / va.norm()) > 0.5
