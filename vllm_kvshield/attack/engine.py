"""Glue to the real engine: start vLLM in a mode, prove the shield's state, read a request's cache blocks.

    llm = open_engine(model, "mix", dtype="bfloat16")
    require_shield(llm, "mix")                          # raises if the worker's model is not shielded in that mode
    obs = observe(llm, tokens, layers=(0, 15), layout=layout_of(llm, "mix"))   # K/V read via the block table
    k_rel, v_rel = plain_mismatch(public, obs, tokens)  # relative distance to plain layer-0 K/V
    close_engine(llm)

Mode "none" is the plugin installed without the flag (vLLM's own Llama behaviour).
"""

import os

import torch

from vllm_kvshield.config import additional_config
from vllm_kvshield.model import shield_status
from vllm_kvshield.shield_status import ShieldStatus

from . import kvcache
from .observation import Layout, Observation
from .public_model import PublicModel

ENGINE_OPTIONS = dict(enforce_eager=True, kv_cache_memory_bytes=256 << 20, max_model_len=1024, seed=0)
SHUFFLED_MODES = ("per-request",)  # the design: per-request keys, rows shuffled per (layer, KV head) in their blocks
PLAIN_MATCH = 0.05  # relative L2 distance under which a cached layer-0 K/V counts as plain (bf16: ~0.005)


class ShieldStateError(RuntimeError):
    """The engine's shield is not in the state the mode asks for (e.g. silently off)."""


def open_engine(model: str, mode: str, dtype: str, **options):
    """A vllm.LLM serving `model` in `mode` (apply_model needs VLLM_ALLOW_INSECURE_SERIALIZATION, set here)."""
    extra = additional_config(mode)
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    from vllm import LLM

    return LLM(model, dtype=dtype, additional_config=extra, **{**ENGINE_OPTIONS, **options})


def close_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()


def require_shield(llm, mode: str) -> dict:
    """The worker's shield status; raises ShieldStateError unless it is off for "none", on in `mode` otherwise."""
    status = llm.apply_model(shield_status)[0]
    expected_on = mode != "none"
    on = ShieldStatus(status["mode"], status["layers_shielded"])
    if on.enabled != expected_on or (expected_on and on.mismatch(mode) is not None):
        raise ShieldStateError(f"kvshield attack: mode {mode!r} asked, but the worker reports {status}")
    return status


def layout_of(llm, mode: str) -> Layout:
    """What the attacker knows of the layout: the engine's block size (public), and the mode's design."""
    block_size = llm.llm_engine.vllm_config.cache_config.block_size
    if mode in SHUFFLED_MODES:
        return Layout(block_size, ordered=False, shared_key=False)
    return Layout(block_size)


def observe(llm, tokens: list[int], layers: tuple[int, ...], layout: Layout, cache_salt: str | None = None) -> Observation:
    """Prefill `tokens` and read their K/V at `layers` from the engine's cache tensors, rows in block-table order.

    cache_salt: the request's tenant (per-request mode: one key per salt; without one, a fresh key per request).
    """
    k, v = kvcache.prompt_kv(llm, tokens, list(layers), cache_salt)
    if k.shape[1] != len(tokens):
        raise RuntimeError(f"read {k.shape[1]} positions from the cache for a {len(tokens)}-token request")
    return Observation(tuple(layers), k, v, layout)


def plain_mismatch(public: PublicModel, obs: Observation, tokens: list[int]) -> tuple[float, float]:
    """Relative L2 distance of the cached layer-0 K and V (rows as stored) to what plain vLLM caches for these tokens."""
    ids = torch.tensor(tokens)
    k, v = obs.at(0)
    plain_k = public.rotate(public.layer0_k[ids], torch.arange(len(tokens)))
    plain_v = public.layer0_v[ids]
    return float((k - plain_k).norm() / plain_k.norm()), float((v - plain_v).norm() / plain_v.norm())


def require_cache_state(mode: str, mismatch: tuple[float, float]) -> None:
    """Plain mode must read back plain K/V (the decoder is right); a shielded mode must not (the shield is on)."""
    k_rel, v_rel = mismatch
    plain = k_rel < PLAIN_MATCH and v_rel < PLAIN_MATCH
    if mode == "none" and not plain:
        raise ShieldStateError(f"kvshield attack: plain engine's cache differs from plain K/V (relative K {k_rel:.3g}, V {v_rel:.3g}): decoder or model mismatch")
    if mode != "none" and (k_rel < PLAIN_MATCH or v_rel < PLAIN_MATCH):
        raise ShieldStateError(f"kvshield attack: mode {mode!r} caches plain K or V (relative K {k_rel:.3g}, V {v_rel:.3g}): the shield is off")


def _worker_fingerprint(model) -> str | None:
    """Runs in the worker: the key fingerprint its enclave reports (a hash, never key material)."""
    from vllm_kvshield import enclave

    handle = getattr(model, "enclave_handle", None)
    return None if handle is None else enclave.call(handle, "info")["fingerprint"]


def key_fingerprint(llm) -> str | None:
    """The fingerprint of the key an engine's shield uses (None for plain vLLM)."""
    return llm.apply_model(_worker_fingerprint)[0]
