"""vllm-kvshield: a vLLM plugin that keeps a model's KV cache unreadable without the key (Llama, Qwen2, Qwen3, Mistral).

    python -m vllm.entrypoints.openai.api_server --model PATH \\
        --additional-config '{"kvshield": {"mode": "mix"}}'
"""

from .families import FAMILIES, Family


def _architectures_of(registry, module_and_class: tuple[str, str]) -> list[str]:
    """Architecture names whose (lazily registered) class is module_and_class."""
    return sorted(
        arch
        for arch, entry in registry.models.items()
        if (getattr(entry, "module_name", None), getattr(entry, "class_name", None)) == module_and_class
    )


def family_architectures(registry, family: Family) -> list[str]:
    """Every architecture name vLLM resolves to the family's class (aliases included), and the shielded class's own name."""
    return sorted(set(_architectures_of(registry, family.vllm_entry)) | {family.shielded_class})


def registered_families() -> dict[str, Family]:
    """Architecture name -> family, for the names the plugin serves shielded."""
    from vllm import ModelRegistry

    return {arch: f for f in FAMILIES for arch in _architectures_of(ModelRegistry, f.shielded_entry)}


def register() -> None:
    """vllm.general_plugins entry point: each shielded class under every name of its family, the config check,
    and (mode per-request) the engine core's key ids."""
    from vllm import ModelRegistry

    from .patches import key_ids, verify_config

    for family in FAMILIES:
        for arch in family_architectures(ModelRegistry, family):
            ModelRegistry.register_model(arch, ":".join(family.shielded_entry))
    verify_config.install()
    key_ids.install()
