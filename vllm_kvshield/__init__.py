"""vllm-kvshield: a vLLM plugin that keeps a Llama model's KV cache unreadable without the key.

    python -m vllm.entrypoints.openai.api_server --model PATH \\
        --additional-config '{"kvshield": {"mode": "mix"}}'
"""

LLAMA_CLASS = ("vllm.model_executor.models.llama", "LlamaForCausalLM")
SHIELDED_CLASS = ("vllm_kvshield.model", "KVShieldLlamaForCausalLM")
EXPLICIT_ARCH = "KVShieldLlamaForCausalLM"


def _architectures_of(registry, module_and_class: tuple[str, str]) -> list[str]:
    """Architecture names whose (lazily registered) class is module_and_class."""
    return sorted(
        arch
        for arch, entry in registry.models.items()
        if (getattr(entry, "module_name", None), getattr(entry, "class_name", None)) == module_and_class
    )


def llama_architectures(registry) -> list[str]:
    """Every architecture name vLLM resolves to its LlamaForCausalLM (aliases included)."""
    return _architectures_of(registry, LLAMA_CLASS)


def registered_architectures() -> list[str]:
    """The architecture names the plugin serves shielded."""
    from vllm import ModelRegistry

    return _architectures_of(ModelRegistry, SHIELDED_CLASS)


def register() -> None:
    """vllm.general_plugins entry point: the shielded class under every Llama name, the config check, and
    (mode per-request) the engine core's key ids."""
    from vllm import ModelRegistry

    from .patches import key_ids, verify_config

    for arch in llama_architectures(ModelRegistry) + [EXPLICIT_ARCH]:
        ModelRegistry.register_model(arch, ":".join(SHIELDED_CLASS))
    verify_config.install()
    key_ids.install()
