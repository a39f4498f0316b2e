"""A Hugging Face Llama config.json, read one way: its attention geometry, with one set of defaults for missing keys.

    shape = attention_shape(read_hf_config("/path/to/model"))   # AttentionShape(num_heads=9, num_kv_heads=3, ...)

Missing (or null) num_key_value_heads means multi-head attention (as many KV heads as heads);
missing (or null) head_dim means hidden_size // num_attention_heads, as transformers reads them.
"""

import json
import os

from .transforms import AttentionShape


def read_hf_config(folder: str) -> dict:
    with open(os.path.join(os.path.expanduser(folder), "config.json"), encoding="utf-8") as f:
        return json.load(f)


def attention_shape(cfg: dict) -> AttentionShape:
    """The full (unsharded) attention geometry of one layer."""
    heads = cfg["num_attention_heads"]
    return AttentionShape(
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        hidden_size=cfg["hidden_size"],
    )
