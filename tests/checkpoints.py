"""Small random-weight Llama checkpoints with the SmolLM2 tokenizer, for shapes SmolLM2 does not have.

Each folder is a real Hugging Face checkpoint (LlamaConfig -> LlamaForCausalLM(config).save_pretrained)
that vLLM loads like any other Llama, built once per (name, dtype) and cached on disk.

    python -m tests.checkpoints gqa-kv4 /tmp/models    # prints the folder
    folder = build("gqa-kv1", root)                    # from a test
"""

import json
import math
import os
import shutil
import sys

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB = 49152  # the SmolLM2 tokenizer's

# name -> LlamaConfig keywords. hidden_size is what the heads imply; 2 or 4 layers (PP=2 splits them).
CONFIGS = {
    "mha-kv4": dict(num_attention_heads=4, num_key_value_heads=4, head_dim=64, hidden_size=256, num_hidden_layers=2),
    "gqa-kv4": dict(num_attention_heads=8, num_key_value_heads=4, head_dim=64, hidden_size=512, num_hidden_layers=4),
    "gqa-kv1": dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64, hidden_size=256, num_hidden_layers=2),
    "gqa-kv2-d128": dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128, hidden_size=512, num_hidden_layers=2),
    "bias-kv4": dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, hidden_size=512, num_hidden_layers=2,
        attention_bias=True,
    ),
    "llama3-rope-kv4": dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, hidden_size=512, num_hidden_layers=2,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        },
    ),
}


def llama_config(name: str):
    """The LlamaConfig of a named shape.

    initializer_range = sqrt(2 / hidden_size): attention scores q.k / sqrt(d) and the logits then
    have a spread of order 1, so a wrong rotary table or head order changes the output
    (the usual 0.02 leaves attention nearly uniform and logits flat).
    """
    from transformers import LlamaConfig

    if name not in CONFIGS:
        raise ValueError(f"unknown checkpoint {name!r}; accepted: {', '.join(CONFIGS)}")
    kw = dict(CONFIGS[name])
    return LlamaConfig(
        vocab_size=VOCAB,
        intermediate_size=2 * kw["hidden_size"],
        max_position_embeddings=2048,
        initializer_range=math.sqrt(2.0 / kw["hidden_size"]),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=["LlamaForCausalLM"],
        **kw,
    )


def build(name: str, root: str, dtype: str = "float32", tokenizer_from: str | None = None, seed: int = 0) -> str:
    """The folder of checkpoint `name` under root, written on first call (seeded: same weights every time)."""
    import torch
    from transformers import LlamaForCausalLM

    folder = os.path.join(root, f"{name}-{dtype}-seed{seed}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    if tokenizer_from is None:
        from vllm_kvshield.default_model import model_path

        tokenizer_from = str(model_path())
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(name)).to(getattr(torch, dtype))
    if model.config.attention_bias:  # HF initialises biases to zero: give them values so they matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                    getattr(layer.self_attn, proj).bias.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    for file in TOKENIZER_FILES:
        src = os.path.join(tokenizer_from, file)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(folder, file))
    with open(done, "w") as f:
        json.dump({"name": name, "dtype": dtype, "seed": seed}, f)
    return folder


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(f"usage: python -m tests.checkpoints NAME ROOT   (NAME: {', '.join(CONFIGS)})")
    print(build(sys.argv[1], sys.argv[2]))
