"""The model families the shield serves, and the settings of a checkpoint it refuses before vLLM starts.

A family is one of vLLM's model classes; the plugin registers a shielded subclass of it
(`vllm_kvshield.model.KVShield<class>`) under every architecture name vLLM maps to that class.

    family = FAMILIES_BY_CLASS["Qwen3ForCausalLM"]       # Family(name='Qwen3', ..., qk_norm=True)
    check_model_settings(family, hf_config_dict)          # raises ShieldConfigError naming the setting

Pure: imports only the standard library (and config's exception).
"""

from dataclasses import dataclass

from .config import ShieldConfigError

MODEL_MODULE = "vllm_kvshield.model"

# get_rope's rope types whose module is a static per-position cos/sin table over every head dim
# (the classes model.py accepts: RotaryEmbedding and its linear, llama3, YaRN and dynamic-NTK
# subclasses); the shield permutes and turns that table.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


@dataclass(frozen=True)
class Family:
    """One of vLLM's model classes, as the shield sees it."""

    name: str  # as the README names it
    vllm_module: str
    vllm_class: str
    qk_norm: bool = False  # q and k pass a per-head RMSNorm (one weight [d] for all heads) before RoPE

    @property
    def shielded_class(self) -> str:
        return f"KVShield{self.vllm_class}"

    @property
    def vllm_entry(self) -> tuple[str, str]:
        return self.vllm_module, self.vllm_class

    @property
    def shielded_entry(self) -> tuple[str, str]:
        return MODEL_MODULE, self.shielded_class


FAMILIES = (
    Family("Llama", "vllm.model_executor.models.llama", "LlamaForCausalLM"),
    Family("Qwen2", "vllm.model_executor.models.qwen2", "Qwen2ForCausalLM"),
    Family("Qwen3", "vllm.model_executor.models.qwen3", "Qwen3ForCausalLM", qk_norm=True),
    Family("Mistral", "vllm.model_executor.models.mistral", "MistralForCausalLM"),
)
FAMILIES_BY_CLASS = {f.vllm_class: f for f in FAMILIES}


def rope_parameters(hf: dict) -> dict:
    """The rope settings of a config dict: transformers 5's rope_parameters, or the older rope_scaling."""
    return hf.get("rope_parameters") or hf.get("rope_scaling") or {}


def head_dim(family: Family, hf: dict) -> int:
    """The head dim vLLM's class for the family uses (its Qwen2 ignores config.json's head_dim)."""
    derived = hf["hidden_size"] // hf["num_attention_heads"]
    return derived if family.name == "Qwen2" else hf.get("head_dim") or derived


def sliding_window(hf: dict) -> int | None:
    """The window vLLM applies (None: full attention), as vLLM and transformers read config.json.

    Qwen2/Qwen3 configs carry a sliding_window that only counts with use_sliding_window;
    vLLM reads 0 as no window.
    """
    if hf.get("use_sliding_window") is False:
        return None
    return hf.get("sliding_window") or None


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
    if partial != 1.0 or (rope_dim and rope_dim != head_dim(family, hf)):
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
