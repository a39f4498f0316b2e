"""Shared helpers of the attack tests (fixtures are in conftest.py)."""

from vllm_kvshield.attack import engine
from vllm_kvshield.attack.stats import recovery_rate

DEEP_LAYER = 15


class Observed:
    """Requests and conversation of one mode, observed once per session from the engine's cache blocks."""

    def __init__(self, llm, mode, requests, conversation):
        self.llm = llm
        self.status = engine.require_shield(llm, mode)
        self.layout = engine.layout_of(llm, mode)
        self.requests = [(r, engine.observe(llm, r.tokens, (0, DEEP_LAYER), self.layout)) for r in requests]
        self.conversation = (conversation, engine.observe(llm, conversation.tokens, (0,), self.layout))


def mean_rate(attack, observed: Observed) -> float:
    rates = [recovery_rate(attack.recover(obs), req.tokens, req.private) for req, obs in observed.requests]
    return sum(rates) / len(rates)
