"""Run every attack against real vLLM engines, one mode at a time, and summarize per mode x attack.

    config = HarnessConfig(model=path, prompts=data.private_prompts())
    report = run(config)            # {"results": ..., "known_plaintext": ..., "intervals": ..., "config": ...}

Per mode: start the engine, prove the shield's state (worker status, and the cached
layer-0 K/V against plain), prefill every request (the victims', the conversations, and
the attacker's own), read its blocks from vLLM's cache tensors with what the attacker
knows of their layout, run the attacks, shut the engine down. Rates are exact-token
matches, per position, on the requests' private (user message) tokens; known-plaintext
rates on the private tokens after position max(counts) of each conversation, the same
positions for every n. What each attack knows is in ATTACKS (and the report).
"""

import platform
from pathlib import Path
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
from .bootstrap import Bootstrap
from .chosen_plaintext import ChosenPlaintext
from .frequency import EqualityFrequency, linked_share
from .known_plaintext import KnownPlaintext
from .kvcloak_dump import write_dump
from .kvcloak import KVCloakCollision, KVCloakInversion, calibrate_threshold
from .llama_forward import LlamaForward
from .moments import CentredPairNorms
from .observation import Observation
from .prior import public_prior
from .rotation_invariants import invariant_forms, token_groups
from .public_model import PublicModel
from .requests import Request, attacker_requests, chat_request, conversations, single_requests
from .template import TemplateBootstrap
from .stats import recovery_rate, summarize

KNOWN_COUNTS = (1, 4, 16, 64, 256)
PREFIX_COUNTS = (8, 16, 32, 64, 128, 256)
DEEP_LAYER = 15
COLLISION_REQUESTS = 8
BOOTSTRAP_REQUESTS = 10  # the single-request bootstraps run on the first this many requests
TEMPLATE_POOLS = (1, 5, 30)  # requests observed together (pooled where the design shares the key)
CHOSEN_COUNTS = (1, 2, 4, 8)  # the attacker's own requests
PREFIX_CONVERSATIONS = 2
ATTACKER_SALT = "attacker-tenant"  # the client attacker's own tenant (per-request: its requests share its key)
KVCLOAK_REQUESTS = 3  # requests dumped per mode for KV-Cloak's own code (scripts/kvcloak_attack.sh)
EVALUATED_AFTER_KNOWN = 128  # a conversation holds at least max(known_counts) + this many tokens

# attack -> what the attacker knows (report groups, in this order)
KNOWS = {
    "ciphertext": "ciphertext only, ignores the template",
    "prior": "ciphertext and a public token-frequency prior",
    "template": "knows the chat template (and the design, the block table)",
    "client": "client of the same server (its own requests' plaintext)",
}
CIPHERTEXT_ONLY = ("direct_k", "direct_v", "invariant_k", "invariant_v", "centred_pair_norms", "kvcloak_inversion")


@dataclass
class HarnessConfig:
    model: str
    prompts: list[str]
    modes: tuple[str, ...] = COMPARED_MODES
    dtype: str = "bfloat16"
    deep_layer: int = DEEP_LAYER
    known_counts: tuple[int, ...] = KNOWN_COUNTS
    collision_requests: int = COLLISION_REQUESTS  # the collision attack runs on the first this many requests
    ciphertext_requests: int | None = None  # the ciphertext-only attacks run on the first this many (None: all)
    prefix_counts: tuple[int, ...] = PREFIX_COUNTS
    bootstrap_requests: int = BOOTSTRAP_REQUESTS
    template_pools: tuple[int, ...] = TEMPLATE_POOLS
    chosen_counts: tuple[int, ...] = CHOSEN_COUNTS
    prefix_conversations: int = PREFIX_CONVERSATIONS  # the bootstrapped known-prefix curve runs on the first this many
    kvcloak_dump: str | None = None  # folder for KV-Cloak-format dumps of the first kvcloak_requests requests
    kvcloak_requests: int = KVCLOAK_REQUESTS

    def __post_init__(self):
        bad = [m for m in self.modes if m not in COMPARED_MODES]
        if bad or not self.modes:
            raise ValueError(f"modes {bad or list(self.modes)}; accepted: {', '.join(COMPARED_MODES)}")
        if not self.prompts:
            raise ValueError("no prompts to attack")
        for name in ("known_counts", "prefix_counts", "template_pools", "chosen_counts"):
            counts = getattr(self, name)
            if not counts or sorted(set(counts)) != list(counts) or counts[0] < 1:
                raise ValueError(f"{name} must be increasing positive integers, got {counts}")


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
        self.bootstrap = Bootstrap(public)
        self.template = TemplateBootstrap(public)
        self.markup = TemplateBootstrap(public, markup_only=True)
        self.chosen = ChosenPlaintext(public)
        self.frequency = EqualityFrequency(public, prior)
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


def attack_names(config: "HarnessConfig") -> dict[str, str]:
    """Every attack of a run -> what its attacker knows (a KNOWS key), in report order."""
    names = {a: "ciphertext" for a in CIPHERTEXT_ONLY}
    names["equality_frequency"] = "prior"
    names["cross_request_equality"] = "prior"
    names.update({f"template_{n}": "template" for n in config.template_pools})
    names["template_markup_1"] = "template"
    names["kvcloak_collision"] = "template"
    names.update({f"chosen_plaintext_{m}": "client" for m in config.chosen_counts})
    return names


@dataclass
class ModeResult:
    """Per-request rates of one mode."""

    rates: dict[str, list[float]] = field(default_factory=dict)  # attack -> per (victim) request
    known_plaintext: dict[int, list[float]] = field(default_factory=dict)  # n -> per conversation (fit, no refit)
    prefix: dict[int, list[float]] = field(default_factory=dict)  # n -> per conversation (bootstrap)
    families: dict[int, dict[str, Counter]] = field(default_factory=dict)  # n -> part -> family (accepted or not)
    seconds: dict[str, float] = field(default_factory=dict)  # attack -> time spent
    checks: dict = field(default_factory=dict)


def _score(result: ModeResult, name: str, guesses: list[torch.Tensor], reqs: list[Request], started: float) -> None:
    result.rates.setdefault(name, []).extend(recovery_rate(g, r.tokens, r.private) for g, r in zip(guesses, reqs))
    result.seconds[name] = result.seconds.get(name, 0.0) + time.monotonic() - started


def attack_request(attacker: Attacker, obs: Observation, req: Request, mode: str, result: ModeResult, collide: bool) -> None:
    """Ciphertext-only attacks (and optionally the collision attack) on one request's observation."""
    for attack in attacker.ciphertext_only:
        t0 = time.monotonic()
        _score(result, attack.name, [attack.recover(obs)], [req], t0)
    if collide:
        t0 = time.monotonic()
        guesses = attacker.collision(mode).recover(obs.with_known(req.header))
        _score(result, "kvcloak_collision", [guesses], [req], t0)


def attack_pools(attacker: Attacker, victims: list[tuple[Request, Observation]], own: list[Observation], config: "HarnessConfig", result: ModeResult) -> None:
    """The attacks that know plaintext: template bootstrap (pooled 1, 5, 30), markup only, chosen plaintext,
    equality and frequency. Pools are cut from the first requests; each victim is scored once per attack."""
    for size in config.template_pools:
        count = max(size, config.bootstrap_requests) if size > 1 else config.bootstrap_requests
        pool_reqs = victims[: size * (min(count, len(victims)) // size)]
        for start in range(0, len(pool_reqs), size):
            t0 = time.monotonic()
            part = pool_reqs[start : start + size]
            _score(result, f"template_{size}", attacker.template.recover_pool([o for _, o in part]), [r for r, _ in part], t0)
    for req, obs in victims[: config.bootstrap_requests]:
        t0 = time.monotonic()
        _score(result, "template_markup_1", attacker.markup.recover_pool([obs]), [req], t0)
    targets = victims[: config.bootstrap_requests]
    for m in config.chosen_counts:
        t0 = time.monotonic()
        _score(result, f"chosen_plaintext_{m}", attacker.chosen.recover_pool([o for _, o in targets], own[:m]), [r for r, _ in targets], t0)
    pool = victims[: max(config.template_pools)]
    t0 = time.monotonic()
    _score(result, "equality_frequency", attacker.frequency.recover_pool([o for _, o in pool]), [r for r, _ in pool], t0)
    t0 = time.monotonic()
    for i, (req, obs) in enumerate(pool):
        others = [o for k, (_, o) in enumerate(pool) if k != i]
        result.rates.setdefault("cross_request_equality", []).append(linked_share(obs, others, req.private))
    result.seconds["cross_request_equality"] = time.monotonic() - t0
    result.checks["equality_frequency_groups_accepted"] = [list(a) for a in attacker.frequency.last_accepted]


def attack_conversation(attacker: Attacker, obs: Observation, req: Request, config: "HarnessConfig", result: ModeResult, bootstrap: bool) -> None:
    """Known plaintext for every n, scored on the private tokens after max(counts): the first n tokens known,
    fitted and undone (ordered layouts only: it needs positions), and bootstrapped from them (any layout)."""
    counts = config.known_counts + config.prefix_counts
    scored = [p for p in req.private if p >= max(counts)]
    if obs.layout.ordered:
        for n in config.known_counts:
            guesses = attacker.known_plaintext.recover(obs.with_known(req.tokens[:n]))
            result.known_plaintext.setdefault(n, []).append(recovery_rate(guesses, req.tokens, scored))
            parts = result.families.setdefault(n, {"k": Counter(), "v": Counter()})
            for part, fit in attacker.known_plaintext.last_fits.items():
                parts[part][fit.family if fit.accepted else "none accepted"] += 1
    if not obs.layout.ordered:  # within-request K: how far equal-token rows pin down the request's map
        k, v = obs.at(0)
        forms = [invariant_forms(k[:, j], token_groups(v[:, j])) for j in range(k.shape[1])]
        result.checks.setdefault("k_rotation_invariants", []).append(
            {"tokens": len(req.tokens), "equations": [f.equations for f in forms], "unknowns": forms[0].unknowns,
             "null_dimension": [f.null_dimension for f in forms], "needed": k.shape[2] // 2}
        )  # fmt: skip
    for n in config.prefix_counts if bootstrap else ():
        t0 = time.monotonic()
        guesses = attacker.bootstrap.recover(obs.with_known(req.tokens[:n]))
        result.prefix.setdefault(n, []).append(recovery_rate(guesses, req.tokens, scored))
        result.seconds["known_prefix"] = result.seconds.get("known_prefix", 0.0) + time.monotonic() - t0


def evaluate_mode(llm, mode: str, attacker: Attacker, singles: list[Request], convs: list[Request], own: list[Request], config: "HarnessConfig", bar=None) -> ModeResult:
    """All attacks on one running engine (already started in `mode`)."""
    result = ModeResult()
    result.checks["shield_status"] = engine.require_shield(llm, mode)
    layout = engine.layout_of(llm, mode)
    result.checks["layout"] = asdict(layout)
    mismatches, victims = [], []
    layers = (0, config.deep_layer)
    for i, req in enumerate(singles):
        obs = engine.observe(llm, req.tokens, layers, layout)
        mismatch = engine.plain_mismatch(attacker.public, obs, req.tokens)
        engine.require_cache_state(mode, mismatch)
        mismatches.append(mismatch)
        victims.append((req, obs))
        if config.ciphertext_requests is None or i < config.ciphertext_requests:
            attack_request(attacker, obs, req, mode, result, collide=i < config.collision_requests)
        if bar is not None:
            bar.update(1)
    if config.kvcloak_dump:
        every = tuple(range(attacker.public.shape.layers))
        for i, req in enumerate(singles[: config.kvcloak_requests]):
            write_dump(Path(config.kvcloak_dump) / mode / str(i), engine.observe(llm, req.tokens, every, layout), req, mode)
    mine = [engine.observe(llm, r.tokens, (0,), layout, ATTACKER_SALT).with_known(r.tokens) for r in own]
    attack_pools(attacker, victims, mine, config, result)
    for i, req in enumerate(convs):
        obs = engine.observe(llm, req.tokens, (0,), layout)
        engine.require_cache_state(mode, engine.plain_mismatch(attacker.public, obs, req.tokens))
        attack_conversation(attacker, obs, req, config, result, bootstrap=i < config.prefix_conversations)
        if bar is not None:
            bar.update(1)
    result.checks["layer0_relative_distance_to_plain"] = {
        "k_median": statistics.median(m[0] for m in mismatches),
        "v_median": statistics.median(m[1] for m in mismatches),
    }
    return result


def needed(rates_by_count: dict[int, float], level: float) -> int | None:
    """The smallest count whose mean rate reaches `level` (None if none does)."""
    return next((n for n in sorted(rates_by_count) if rates_by_count[n] >= level), None)


def summarize_modes(results: dict[str, ModeResult], names: dict[str, str] | None = None) -> dict:
    """attack.json's results, known_plaintext, prefix curve, intervals and per-mode details from per-request rates."""
    out = {"results": {}, "known_plaintext": {}, "known_prefix": {}, "intervals": {"results": {}, "known_plaintext": {}, "known_prefix": {}}, "details": {}}
    for mode, r in results.items():
        out["results"][mode], out["intervals"]["results"][mode] = {}, {}
        for name, rates in r.rates.items():
            mean, low, high = summarize(rates)
            out["results"][mode][name] = mean
            out["intervals"]["results"][mode][name] = [low, high]
        for key, curve in (("known_plaintext", r.known_plaintext), ("known_prefix", r.prefix)):
            out[key][mode], out["intervals"][key][mode] = {}, {}
            for n, rates in curve.items():
                mean, low, high = summarize(rates)
                out[key][mode][str(n)] = mean
                out["intervals"][key][mode][str(n)] = [low, high]
        prefix = {int(n): m for n, m in out["known_prefix"][mode].items()}
        chosen = {int(a.rsplit("_", 1)[1]): m for a, m in out["results"][mode].items() if a.startswith("chosen_plaintext_")}
        out["details"][mode] = {
            "requests_per_attack": {name: len(v) for name, v in r.rates.items()},
            "seconds_per_attack": r.seconds,
            "known_plaintext_families": {str(n): {p: dict(c) for p, c in parts.items()} for n, parts in r.families.items()},
            "known_prefix_passes_1_percent_at": needed(prefix, 0.01),
            "chosen_plaintext_requests_for_99_percent": needed(chosen, 0.99),
            **r.checks,
        }
    if names is not None:
        out["attacks"] = {a: {"knows": k, "knows_label": KNOWS[k]} for a, k in names.items()}
    return out


def run(config: HarnessConfig, progress: bool = True) -> dict:
    """Every mode's engine in turn (one at a time), every attack; the attack.json content."""
    started = time.monotonic()
    public = PublicModel.load(config.model)
    engine_dtype = getattr(torch, config.dtype) if config.dtype != "auto" else torch.bfloat16
    attacker = Attacker(public, config.deep_layer, engine_dtype)
    tok = public.tokenizer
    singles = single_requests(tok, config.prompts)
    longest = max(config.known_counts + config.prefix_counts)
    convs = conversations(tok, config.prompts, longest + EVALUATED_AFTER_KNOWN)
    if not convs:
        raise ValueError(f"the prompts make no conversation of {longest + EVALUATED_AFTER_KNOWN} tokens")
    own = attacker_requests(tok, max(config.chosen_counts))
    results, seconds = {}, {}
    bar = tqdm(total=len(config.modes) * (len(singles) + len(convs)), unit="request", disable=not progress)
    for mode in config.modes:
        bar.set_description(f"mode {mode}: starting vLLM")
        t0 = time.monotonic()
        llm = engine.open_engine(config.model, mode, config.dtype)
        try:
            bar.set_description(f"mode {mode}")
            results[mode] = evaluate_mode(llm, mode, attacker, singles, convs, own, config, bar)
        finally:
            engine.close_engine(llm)
        seconds[mode] = time.monotonic() - t0
    bar.close()
    report = summarize_modes(results, attack_names(config))
    report["config"] = {
        **{k: v for k, v in asdict(config).items() if k != "prompts"},
        "prompts": len(config.prompts),
        "private_tokens": sum(len(r.private) for r in singles),
        "conversations": len(convs),
        "conversation_tokens": [len(r.tokens) for r in convs],
        "known_plaintext_scored_from_position": longest,
        "attacker_requests": [len(r.tokens) for r in own],
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
