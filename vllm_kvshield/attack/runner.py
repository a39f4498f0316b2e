"""Run every attack against real vLLM engines, one mode at a time, and summarize per mode x attack.

    config = HarnessConfig(model=path, prompts=data.private_prompts())
    report = run(config)            # {"results": ..., "known_plaintext": ..., "intervals": ..., "config": ...}

Per mode: start the engine, prove the shield's state (worker status, and the cached
layer-0 K/V against plain), prefill every request, read its blocks from vLLM's cache
tensors, run the attacks, shut the engine down. Rates are exact-token matches on the
requests' private (user message) tokens; known-plaintext rates on the private tokens
after position max(known_counts) of each conversation, the same positions for every n.
"""

import platform
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

from vllm_kvshield.config import COMPARED_MODES

from . import engine
from .direct import DirectInversion
from .invariant import PermutationInvariant
from .known_plaintext import KnownPlaintext
from .kvcloak import KVCloakCollision, KVCloakInversion, calibrate_threshold
from .llama_forward import LlamaForward
from .moments import CentredPairNorms
from .observation import Observation
from .prior import public_prior
from .public_model import PublicModel
from .requests import Request, chat_request, conversations, single_requests
from .stats import recovery_rate, summarize

KNOWN_COUNTS = (1, 4, 16, 64, 256)
DEEP_LAYER = 15
COLLISION_REQUESTS = 8
EVALUATED_AFTER_KNOWN = 128  # a conversation holds at least max(known_counts) + this many tokens
CIPHERTEXT_ONLY = (
    "direct_k", "direct_v", "invariant_k", "invariant_v", "centred_pair_norms", "kvcloak_inversion", "kvcloak_collision",
)  # fmt: skip


@dataclass
class HarnessConfig:
    model: str
    prompts: list[str]
    modes: tuple[str, ...] = COMPARED_MODES
    dtype: str = "bfloat16"
    deep_layer: int = DEEP_LAYER
    known_counts: tuple[int, ...] = KNOWN_COUNTS
    collision_requests: int = COLLISION_REQUESTS  # the collision attack runs on the first this many requests

    def __post_init__(self):
        bad = [m for m in self.modes if m not in COMPARED_MODES]
        if bad or not self.modes:
            raise ValueError(f"modes {bad or list(self.modes)}; accepted: {', '.join(COMPARED_MODES)}")
        if not self.prompts:
            raise ValueError("no prompts to attack")
        if sorted(set(self.known_counts)) != list(self.known_counts) or self.known_counts[0] < 1:
            raise ValueError(f"known_counts must be increasing positive integers, got {self.known_counts}")


def calibration_text() -> str:
    """A public paragraph (Alice in Wonderland, chapter I) for calibrating the collision threshold."""
    from vllm_kvshield import data

    text = data.text("alice")
    start = text.index("Alice was beginning")
    return " ".join(text[start : text.index("\n\n", start)].split())


class Attacker:
    """Everything the attacker builds from public material, shared across modes."""

    def __init__(self, public: PublicModel, deep_layer: int, engine_dtype: torch.dtype):
        if not 0 < deep_layer < public.shape.layers:
            raise ValueError(f"deep layer {deep_layer} out of range 1..{public.shape.layers - 1}")
        self.public = public
        self.deep_layer = deep_layer
        self.engine_dtype = engine_dtype
        prior = public_prior(public.tokenizer, public.shape.vocab)
        self.ciphertext_only = [
            DirectInversion(public, "k"), DirectInversion(public, "v"),
            PermutationInvariant(public, "k"), PermutationInvariant(public, "v"),
            CentredPairNorms(public, prior), KVCloakInversion(public),
        ]  # fmt: skip
        self.known_plaintext = KnownPlaintext(public)
        self.forward = LlamaForward(public)
        self.calibrations: dict[str, dict] = {}  # collision features -> threshold calibration

    def calibration(self, features: str) -> dict:
        if features not in self.calibrations:
            req = chat_request(self.public.tokenizer, [calibration_text()])
            self.calibrations[features] = calibrate_threshold(
                self.public, req.tokens, req.private[0], self.deep_layer, features, self.engine_dtype
            )
        return self.calibrations[features]

    def collision(self, mode: str) -> KVCloakCollision:
        """Raw features on plain vLLM (the paper), permutation-invariant ones where the mode hides positions."""
        features = "raw" if mode == "none" else "invariant"
        threshold = self.calibration(features)["threshold"]
        return KVCloakCollision(self.forward, self.deep_layer, threshold, features)


@dataclass
class ModeResult:
    """Per-request rates of one mode."""

    rates: dict[str, list[float]] = field(default_factory=dict)  # attack -> per request
    known_plaintext: dict[int, list[float]] = field(default_factory=dict)  # n -> per conversation
    families: dict[int, dict[str, Counter]] = field(default_factory=dict)  # n -> part -> family (accepted or not)
    checks: dict = field(default_factory=dict)


def attack_request(attacker: Attacker, obs: Observation, req: Request, mode: str, result: ModeResult, collide: bool) -> None:
    """Ciphertext-only attacks (and optionally the collision attack) on one request's observation."""
    for attack in attacker.ciphertext_only:
        result.rates.setdefault(attack.name, []).append(recovery_rate(attack.recover(obs), req.tokens, req.private))
    if collide:
        guesses = attacker.collision(mode).recover(obs.with_known(req.header))
        result.rates.setdefault("kvcloak_collision", []).append(recovery_rate(guesses, req.tokens, req.private))


def attack_conversation(attacker: Attacker, obs: Observation, req: Request, known_counts, result: ModeResult) -> None:
    """Known-plaintext recovery for every n, scored on the private tokens after max(known_counts)."""
    scored = [p for p in req.private if p >= max(known_counts)]
    for n in known_counts:
        guesses = attacker.known_plaintext.recover(obs.with_known(req.tokens[:n]))
        result.known_plaintext.setdefault(n, []).append(recovery_rate(guesses, req.tokens, scored))
        parts = result.families.setdefault(n, {"k": Counter(), "v": Counter()})
        for part, fit in attacker.known_plaintext.last_fits.items():
            parts[part][fit.family if fit.accepted else "none accepted"] += 1


def evaluate_mode(llm, mode: str, attacker: Attacker, singles: list[Request], convs: list[Request], config: HarnessConfig, bar=None) -> ModeResult:
    """All attacks on one running engine (already started in `mode`)."""
    result = ModeResult()
    result.checks["shield_status"] = engine.require_shield(llm, mode)
    mismatches = []
    layers = (0, config.deep_layer)
    for i, req in enumerate(singles):
        obs = engine.observe(llm, req.tokens, layers)
        mismatch = engine.plain_mismatch(attacker.public, obs, req.tokens)
        engine.require_cache_state(mode, mismatch)
        mismatches.append(mismatch)
        attack_request(attacker, obs, req, mode, result, collide=i < config.collision_requests)
        if bar is not None:
            bar.update(1)
    for req in convs:
        obs = engine.observe(llm, req.tokens, (0,))
        engine.require_cache_state(mode, engine.plain_mismatch(attacker.public, obs, req.tokens))
        attack_conversation(attacker, obs, req, config.known_counts, result)
        if bar is not None:
            bar.update(1)
    result.checks["layer0_relative_distance_to_plain"] = {
        "k_median": statistics.median(m[0] for m in mismatches),
        "v_median": statistics.median(m[1] for m in mismatches),
    }
    return result


def summarize_modes(results: dict[str, ModeResult]) -> dict:
    """attack.json's results, known_plaintext, intervals and per-mode details from per-request rates."""
    out = {"results": {}, "known_plaintext": {}, "intervals": {"results": {}, "known_plaintext": {}}, "details": {}}
    for mode, r in results.items():
        out["results"][mode], out["intervals"]["results"][mode] = {}, {}
        for name in CIPHERTEXT_ONLY:
            if name in r.rates:
                mean, low, high = summarize(r.rates[name])
                out["results"][mode][name] = mean
                out["intervals"]["results"][mode][name] = [low, high]
        out["known_plaintext"][mode], out["intervals"]["known_plaintext"][mode] = {}, {}
        for n, rates in r.known_plaintext.items():
            mean, low, high = summarize(rates)
            out["known_plaintext"][mode][str(n)] = mean
            out["intervals"]["known_plaintext"][mode][str(n)] = [low, high]
        out["details"][mode] = {
            "requests_per_attack": {name: len(v) for name, v in r.rates.items()},
            "known_plaintext_families": {str(n): {p: dict(c) for p, c in parts.items()} for n, parts in r.families.items()},
            **r.checks,
        }
    return out


def run(config: HarnessConfig, progress: bool = True) -> dict:
    """Every mode's engine in turn (one at a time), every attack; the attack.json content."""
    started = time.monotonic()
    public = PublicModel.load(config.model)
    engine_dtype = getattr(torch, config.dtype) if config.dtype != "auto" else torch.bfloat16
    attacker = Attacker(public, config.deep_layer, engine_dtype)
    tok = public.tokenizer
    singles = single_requests(tok, config.prompts)
    convs = conversations(tok, config.prompts, max(config.known_counts) + EVALUATED_AFTER_KNOWN)
    if not convs:
        raise ValueError(f"the prompts make no conversation of {max(config.known_counts) + EVALUATED_AFTER_KNOWN} tokens")
    results, seconds = {}, {}
    bar = tqdm(total=len(config.modes) * (len(singles) + len(convs)), unit="request", disable=not progress)
    for mode in config.modes:
        bar.set_description(f"mode {mode}: starting vLLM")
        t0 = time.monotonic()
        llm = engine.open_engine(config.model, mode, config.dtype)
        try:
            bar.set_description(f"mode {mode}")
            results[mode] = evaluate_mode(llm, mode, attacker, singles, convs, config, bar)
        finally:
            engine.close_engine(llm)
        seconds[mode] = time.monotonic() - t0
    bar.close()
    report = summarize_modes(results)
    report["config"] = {
        **{k: v for k, v in asdict(config).items() if k != "prompts"},
        "prompts": len(config.prompts),
        "private_tokens": sum(len(r.private) for r in singles),
        "conversations": len(convs),
        "conversation_tokens": [len(r.tokens) for r in convs],
        "known_plaintext_scored_from_position": max(config.known_counts),
        "collision": {
            "layer": config.deep_layer,
            "requests": min(config.collision_requests, len(singles)),
            "shortlist": "top 8, then 56, then 192 next tokens of the public model (256 in all); stop at the first miss",
            "calibration": attacker.calibrations,
        },
        "engine": {"options": engine.ENGINE_OPTIONS, "dtype": config.dtype},
        "seconds": {"per_mode": seconds, "total": time.monotonic() - started},
        "versions": _versions(),
    }
    return report


def _versions() -> dict:
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "python": platform.python_version()}
