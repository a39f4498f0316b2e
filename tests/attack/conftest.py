"""Fixtures of the attack tests: the public model, and real observations read from real engines' cache blocks.

Engines come from the session pool in tests/conftest.py: bf16, one per mode, shared with the claims tests
(test_attack_claims.py) and the quality tests.
"""

import pytest

from vllm_kvshield import data
from vllm_kvshield.attack.public_model import PublicModel
from vllm_kvshield.attack.requests import conversations, single_requests

from attack_helpers import DEEP_LAYER, Observed

REQUESTS = 10  # private prompts observed per mode
CONVERSATION_TOKENS = 300  # enough for 256 known tokens and some to recover


@pytest.fixture(scope="session")
def public(model_path) -> PublicModel:
    return PublicModel.load(model_path)


@pytest.fixture(scope="session")
def requests_(public):
    return single_requests(public.tokenizer, data.private_prompts()[:REQUESTS])


@pytest.fixture(scope="session")
def conversation(public):
    return conversations(public.tokenizer, data.private_prompts(), CONVERSATION_TOKENS)[0]


@pytest.fixture(scope="session")
def plain(engines, requests_, conversation) -> Observed:
    return Observed(engines.get("none", "bfloat16"), "none", requests_, conversation)


@pytest.fixture(scope="session")
def permuted(engines, requests_, conversation) -> Observed:
    return Observed(engines.get("permute", "bfloat16"), "permute", requests_, conversation)
