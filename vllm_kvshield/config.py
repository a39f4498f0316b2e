"""The shield's one configuration, parsed from vLLM's `additional_config["kvshield"]`.

    --additional-config '{"kvshield": {"mode": "mix", "key_file": "/etc/kvshield.key"}}'
"""

from dataclasses import dataclass, fields
from typing import NoReturn

from .families import Family, rope_parameters
from .hf_config import attention_shape
from .transforms import MODES

CONFIG_KEY = "kvshield"
DEFAULT_MODE = "mix"
DEFAULT_PREPARE_AHEAD = 64
DEFAULT_FETCH_AHEAD = 32
# What the evaluation tools (attack, bench) compare: the plugin installed without the flag, then every mode.
PLAIN_MODE = "none"
COMPARED_MODES = (PLAIN_MODE, *MODES)

# Loaders that stream checkpoint tensors through model.load_weights (the others bypass the enclave).
SUPPORTED_LOAD_FORMATS = ("auto", "hf", "safetensors", "pt", "npcache", "fastsafetensors")
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bfloat16", "float16", "float32")
SUPPORTED_MODEL_IMPLS = ("auto", "vllm")
# get_rope's rope types whose module is a static per-position cos/sin table over every head dim
# (model.SUPPORTED_ROPES: RotaryEmbedding and its linear, llama3, YaRN and dynamic-NTK
# subclasses); the shield permutes and turns that table.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


class ShieldConfigError(ValueError):
    """The kvshield configuration is invalid: the shield refuses to start."""


class ShieldError(RuntimeError):
    """The shield was asked for but cannot be guaranteed: refuse to serve."""


@dataclass(frozen=True)
class ShieldConfig:
    mode: str = DEFAULT_MODE
    key_file: str | None = None  # None: a fresh random key per start
    ray_address: str | None = None  # None: RAY_ADDRESS if set, else a private local Ray per server; "auto": the running cluster
    enclave_resources: dict[str, float] | None = None  # Ray custom resources that pin the enclave actor
    # mode per-request: fresh requests whose matrices the enclave expands before they arrive, per worker
    # (enclave memory: this many times a request's matrices, 4 L H_kv d^2 numbers); 0: each when it arrives
    prepare_ahead: int = DEFAULT_PREPARE_AHEAD
    # mode per-request: fresh requests whose matrices each worker fetches from the enclave before they arrive
    # (the worker then holds this many requests' matrices ahead of them); 0: each when it arrives
    fetch_ahead: int = DEFAULT_FETCH_AHEAD

    def __post_init__(self):
        if self.mode not in MODES:
            raise ShieldConfigError(f"kvshield: unknown mode {self.mode!r}; accepted modes: {', '.join(MODES)}")
        for name in ("key_file", "ray_address"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ShieldConfigError(f"kvshield: {name} must be a non-empty string, got {value!r}")
        for name, most in (("prepare_ahead", 4096), ("fetch_ahead", 256)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= most:
                raise ShieldConfigError(f"kvshield: {name} must be an integer from 0 to {most}, got {value!r}")
        res = self.enclave_resources
        if res is not None and not (
            isinstance(res, dict)
            and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0 for k, v in res.items())
        ):
            raise ShieldConfigError(
                f"kvshield: enclave_resources must map resource names to positive numbers, got {res!r}"
            )

    @classmethod
    def from_dict(cls, raw) -> "ShieldConfig":
        if not isinstance(raw, dict):
            raise ShieldConfigError(f"kvshield: config must be a JSON object, got {raw!r}")
        accepted = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(accepted))
        if unknown:
            raise ShieldConfigError(f"kvshield: unknown config key(s) {', '.join(unknown)}; accepted keys: {', '.join(accepted)}")
        return cls(**raw)

    @classmethod
    def from_vllm_config(cls, vllm_config) -> "ShieldConfig | None":
        """The shield config of a VllmConfig, or None when the shield is not asked for."""
        extra = vllm_config.additional_config
        if not isinstance(extra, dict) or CONFIG_KEY not in extra:
            return None
        return cls.from_dict(extra[CONFIG_KEY])


def check_supported(vllm_config, families: dict[str, Family]) -> None:
    """Refuse what the shield cannot protect, naming the value and the accepted ones.

    families: architecture name -> the family of the class the plugin registered under it.
    """
    model_config = vllm_config.model_config
    arch = model_config.architecture
    if model_config.model_impl not in SUPPORTED_MODEL_IMPLS or arch not in families:
        raise ShieldConfigError(
            f"kvshield: architecture {arch!r} (model_impl={model_config.model_impl!r}) is not supported; "
            f"accepted: {', '.join(sorted(families))} with model_impl {' or '.join(SUPPORTED_MODEL_IMPLS)}"
        )
    check_model_settings(families[arch], model_config.hf_text_config.to_dict())
    if model_config.quantization is not None or vllm_config.quant_config is not None:
        raise ShieldConfigError(
            f"kvshield: quantized checkpoints are not supported (quantization={model_config.quantization!r}); "
            "the transform needs full-precision attention weights"
        )
    load_format = str(vllm_config.load_config.load_format)
    if load_format not in SUPPORTED_LOAD_FORMATS:
        raise ShieldConfigError(
            f"kvshield: load_format {load_format!r} bypasses the enclave; accepted: {', '.join(SUPPORTED_LOAD_FORMATS)}"
        )
    if vllm_config.lora_config is not None:
        raise ShieldConfigError("kvshield: LoRA adapters are not supported (they are trained on the untransformed attention)")
    kv_dtype = str(vllm_config.cache_config.cache_dtype)
    if kv_dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise ShieldConfigError(
            f"kvshield: kv_cache_dtype {kv_dtype!r} is not supported; accepted: {', '.join(SUPPORTED_KV_CACHE_DTYPES)}"
        )
    shield = ShieldConfig.from_vllm_config(vllm_config)
    if shield is not None and shield.mode == "per-request":
        check_per_request(vllm_config)


def refuse_per_request(what: str, why: str) -> NoReturn:
    raise ShieldConfigError(f"kvshield: mode 'per-request' does not support {what}: {why}")


def check_sliding_window(mode: str, window: int | None) -> None:
    """Refuse mode per-request on a model whose attention has a sliding window (the window vLLM applies, or None)."""
    if mode == "per-request" and window is not None:
        refuse_per_request(f"sliding-window attention (sliding_window={window})", "the window masks rows by slot, and rows move inside their blocks")


def check_per_request(vllm_config) -> None:
    """Refuse, by name, the vLLM features mode per-request cannot keep exact or cannot see."""
    from vllm.platforms import current_platform

    from .patches import key_ids as engine_patch

    refuse = refuse_per_request

    if not current_platform.is_cpu():
        refuse(f"the {current_platform.device_name!r} platform", "its row shuffle knows only vLLM's CPU KV cache layout (run on CPU, or use mode 'mix')")
    if vllm_config.speculative_config is not None:
        refuse("speculative decoding", "rejected draft rows are overwritten in place, and rows are moved after each step")
    if vllm_config.use_v2_model_runner:
        refuse("vLLM's V2 model runner", "it does not report its batch to logits processors; set VLLM_USE_V2_MODEL_RUNNER=0")
    if vllm_config.model_config.runner_type != "generate":
        refuse(f"runner {vllm_config.model_config.runner_type!r}", "only generation requests get request keys")
    check_sliding_window("per-request", vllm_config.model_config.get_sliding_window())
    if engine_patch.missing():
        refuse(f"this vLLM's engine core", "EngineCore.preprocess_add_request, where requests get their key ids, is missing")
    block_size = vllm_config.cache_config.block_size
    if block_size is not None:
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        from .kv_layout import ISAS

        isa = _get_attn_isa(vllm_config.model_config.dtype, block_size, vllm_config.model_config.get_head_size(), "auto")
        if isa not in ISAS:
            refuse(f"CPU attention ISA {isa!r}", f"the row shuffle knows only these KV block layouts: {', '.join(ISAS)}")


def parse_modes(text: str, baseline: bool = False) -> tuple[str, ...]:
    """A comma-separated list of COMPARED_MODES: known ones, none twice, in COMPARED_MODES' order.

    baseline: the list must hold PLAIN_MODE and at least one shield mode (a comparison against plain).
    """
    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    unknown = [m for m in modes if m not in COMPARED_MODES]
    if unknown or not modes:
        raise ShieldConfigError(
            f"kvshield: unknown mode(s) {', '.join(unknown) or repr(text)}; accepted: {', '.join(COMPARED_MODES)}"
        )
    if len(set(modes)) != len(modes):
        raise ShieldConfigError(f"kvshield: mode listed twice in {text!r}")
    if baseline and (PLAIN_MODE not in modes or len(modes) < 2):
        raise ShieldConfigError(
            f"kvshield: --modes needs the baseline {PLAIN_MODE!r} and at least one of {', '.join(MODES)}, got {text!r}"
        )
    return tuple(m for m in COMPARED_MODES if m in modes)


def additional_config(mode: str) -> dict:
    """vLLM's additional_config for one of COMPARED_MODES: the flag with that mode; none for PLAIN_MODE."""
    if mode not in COMPARED_MODES:
        raise ShieldConfigError(f"kvshield: unknown mode {mode!r}; accepted: {', '.join(COMPARED_MODES)}")
    return {} if mode == PLAIN_MODE else {CONFIG_KEY: {"mode": mode}}


def check_model_settings(family: Family, hf: dict) -> None:
    """Refuse, in one line naming the setting, what the family's shielded class cannot keep exact.

    hf: the model's (text) config as a dict (config.json, or vLLM's hf_text_config.to_dict()).
    """
    rope = rope_parameters(hf)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ShieldConfigError(
            f"kvshield: rope_type {rope_type!r} is not supported (its rotary module is not a static cos/sin "
            f"table the shield can permute); accepted: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    for setting, why in (
        ("mrope_section", "multimodal rope rotates sections by separate positions"),
        ("use_fope", "Fourier rope mixes rotary frequencies"),
        ("alpha", "dynamic NTK-alpha rope recomputes its table"),
    ):
        if rope.get(setting):
            raise ShieldConfigError(f"kvshield: rope setting {setting}={rope[setting]!r} is not supported ({why})")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    rope_dim = rope.get("rope_dim")
    if partial != 1.0 or (rope_dim and rope_dim != attention_shape(hf, family).head_dim):
        setting = f"partial_rotary_factor={partial}" if partial != 1.0 else f"rope_dim={rope_dim}"
        raise ShieldConfigError(
            f"kvshield: partial rotary ({setting}) is not supported: the K transform treats every head dim "
            "as half of a rotary pair"
        )
    if hf.get("dual_chunk_attention_config"):
        raise ShieldConfigError(
            "kvshield: dual_chunk_attention_config is not supported (dual-chunk attention rotates q and k "
            "with tables of its own)"
        )
    if hf.get("qk_norm") and not family.qk_norm:
        raise ShieldConfigError(
            f"kvshield: {family.name} with qk_norm=true is not supported (only Qwen3's q/k norms are shielded and tested)"
        )
