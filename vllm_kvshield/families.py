"""The model families the shield serves, and how their config.json reads (data only; config.py checks it).

A family is one of vLLM's model classes; the plugin registers a shielded subclass of it
(`vllm_kvshield.model.KVShield<class>`) under every architecture name vLLM maps to that class.

    family = FAMILIES_BY_CLASS["Qwen3ForCausalLM"]       # Family(name='Qwen3', ..., qk_norm=True)
    sliding_window(config_json)                          # None, or the window vLLM applies

Pure: imports only the standard library.
"""

from dataclasses import dataclass

MODEL_MODULE = "vllm_kvshield.model"


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


def sliding_window(hf: dict) -> int | None:
    """The window vLLM applies (None: full attention), as vLLM and transformers read config.json.

    Qwen2/Qwen3 configs carry a sliding_window that only counts with use_sliding_window;
    vLLM reads 0 as no window.
    """
    if hf.get("use_sliding_window") is False:
        return None
    return hf.get("sliding_window") or None
