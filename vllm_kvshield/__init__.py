"""vllm-kvshield: a vLLM plugin that keeps a Llama model's KV cache unreadable without the key.

    python -m vllm.entrypoints.openai.api_server --model PATH \\
        --additional-config '{"kvshield": {"mode": "mix"}}'
"""

LLAMA_MODULE = "vllm.model_executor.models.llama"
SHIELDED_CLASS = "vllm_kvshield.model:KVShieldLlamaForCausalLM"
EXPLICIT_ARCH = "KVShieldLlamaForCausalLM"


def llama_architectures(registry) -> list[str]:
    """Every architecture name vLLM resolves to its LlamaForCausalLM (aliases included)."""
    return sorted(
        arch
        for arch, entry in registry.models.items()
        if getattr(entry, "module_name", None) == LLAMA_MODULE and getattr(entry, "class_name", None) == "LlamaForCausalLM"
    )


def register() -> None:
    """vllm.general_plugins entry point: register the shielded Llama class under every Llama name."""
    from vllm import ModelRegistry

    for arch in llama_architectures(ModelRegistry) + [EXPLICIT_ARCH]:
        ModelRegistry.register_model(arch, SHIELDED_CLASS)
