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


def _switch_shuffle(on: bool) -> None:
    from vllm_kvshield import cache_shuffle

    if not hasattr(cache_shuffle, "kept_plan_step"):
        cache_shuffle.kept_plan_step = cache_shuffle.plan_step
    cache_shuffle.plan_step = cache_shuffle.kept_plan_step if on else (lambda *args, **kwargs: None)


def shuffle_off(model) -> None:
    """Runs in the worker (apply_model; a module-level function, which vLLM's worker pipe can pickle): the
    per-request mode's row shuffle switched off, the weakened transform of the claims test."""
    _switch_shuffle(False)


def shuffle_on(model) -> None:
    """Runs in the worker: the row shuffle back on."""
    _switch_shuffle(True)
