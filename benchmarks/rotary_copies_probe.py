"""Run in each engine's worker by benchmarks/rotary_copies.py (LLM.apply_model pickles it by module name)."""


def rotary_modules(model) -> int:
    """How many distinct rotary modules the model's layers use."""
    return len({id(layer.self_attn.rotary_emb) for layer in model.model.layers})
