"""A Hugging Face config.json, read one way: its family and attention geometry, with one set of defaults for missing keys.

    shape = attention_shape(read_hf_config("/path/to/model"))   # AttentionShape(num_heads=9, num_kv_heads=3, ...)

Missing (or null) num_key_value_heads means multi-head attention (as many KV heads as heads);
missing (or null) head_dim means hidden_size // num_attention_heads, as transformers reads them;
vLLM's Qwen2 always uses hidden_size // num_attention_heads.
"""

import json
import os

from .families import FAMILIES, FAMILIES_BY_CLASS, Family
from .transforms import AttentionShape


def read_hf_config(folder: str) -> dict:
    with open(os.path.join(os.path.expanduser(folder), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def family_of(cfg: dict) -> Family:
    """The family of a config: by architecture (vLLM's or the shielded class's name), then by model_type;
    else Llama (an alias such as Ministral3ForCausalLM reads as Llama and Mistral do)."""
    by_name = {**FAMILIES_BY_CLASS, **{f.shielded_class: f for f in FAMILIES}}
    for arch in cfg.get("architectures") or []:
        if arch in by_name:
            return by_name[arch]
    by_type = {f.name.lower(): f for f in FAMILIES}
    return by_type.get(cfg.get("model_type"), FAMILIES_BY_CLASS["LlamaForCausalLM"])


def attention_shape(cfg: dict, family: Family | None = None) -> AttentionShape:
    """The full (unsharded) attention geometry of one layer, as vLLM's class for the family builds it."""
    family = family or family_of(cfg)
    heads = cfg["num_attention_heads"]
    derived = cfg["hidden_size"] // heads
    return AttentionShape(
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=derived if family.name == "Qwen2" else cfg.get("head_dim") or derived,
        hidden_size=cfg["hidden_size"],
        qk_norm=family.qk_norm,
    )
