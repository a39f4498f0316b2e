"""Small random-weight checkpoints (Llama, Qwen2, Qwen3, Mistral) with the SmolLM2 tokenizer.

Each folder is a real Hugging Face checkpoint (<Family>Config -> AutoModelForCausalLM.from_config(config)
.save_pretrained) that vLLM loads like any other model of that architecture, built once per
(name, dtype) and cached on disk.

    python -m tests.checkpoints qwen3-kv2 /tmp/models  # prints the folder
    folder = build("gqa-kv1", root)                    # from a test
"""

import json
import math
import os
import shutil
import sys
from dataclasses import dataclass

from vllm_kvshield.hf_config import attention_shape
from vllm_kvshield.transforms import AttentionShape

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
VOCAB = 49152  # the SmolLM2 tokenizer's

# family -> (transformers config class, architecture name in config.json)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}

# name -> (family, config keywords). hidden_size is what the heads imply unless head_dim is given
# (Qwen2 always uses hidden_size / heads); 2 or 4 layers (PP=2 splits them).
CONFIGS = {
    "mha-kv4": ("llama", dict(num_attention_heads=4, num_key_value_heads=4, head_dim=64, hidden_size=256, num_hidden_layers=2)),
    "gqa-kv4": ("llama", dict(num_attention_heads=8, num_key_value_heads=4, head_dim=64, hidden_size=512, num_hidden_layers=4)),
    "gqa-kv1": ("llama", dict(num_attention_heads=4, num_key_value_heads=1, head_dim=64, hidden_size=256, num_hidden_layers=2)),
    "gqa-kv2-d128": ("llama", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=128, hidden_size=512, num_hidden_layers=2)),
    "bias-kv4": ("llama", dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, hidden_size=512, num_hidden_layers=2,
        attention_bias=True,
    )),
    "llama3-rope-kv4": ("llama", dict(
        num_attention_heads=8, num_key_value_heads=4, head_dim=64, hidden_size=512, num_hidden_layers=2,
        rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 256,
        },
    )),
    # q/k/v biases always (vLLM's Qwen2 has no o_proj bias)
    "qwen2-kv2": ("qwen2", dict(num_attention_heads=4, num_key_value_heads=2, hidden_size=256, num_hidden_layers=2)),
    # q_norm/k_norm per head before RoPE; head_dim * heads != hidden_size, as in real Qwen3s
    "qwen3-kv2": ("qwen3", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=192, num_hidden_layers=2)),
    "qwen3-bias-kv2": ("qwen3", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=192, num_hidden_layers=2,
        attention_bias=True,
    )),
    # a sliding window shorter than the test prompts, so it changes the output
    "mistral-sw32-kv2": ("mistral", dict(
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, num_hidden_layers=2,
        sliding_window=32,
    )),
}


def family(name: str) -> str:
    if name not in CONFIGS:
        raise ValueError(f"unknown checkpoint {name!r}; accepted: {', '.join(CONFIGS)}")
    return CONFIGS[name][0]


def hf_config(name: str):
    """The transformers config of a named shape.

    initializer_range = sqrt(2 / hidden_size): attention scores q.k / sqrt(d) and the logits then
    have a spread of order 1, so a wrong rotary table or head order changes the output
    (the usual 0.02 leaves attention nearly uniform and logits flat).
    """
    import transformers

    config_class, architecture = FAMILIES[family(name)]
    kw = dict(CONFIGS[name][1])
    return getattr(transformers, config_class)(
        vocab_size=VOCAB,
        intermediate_size=2 * kw["hidden_size"],
        max_position_embeddings=2048,
        initializer_range=math.sqrt(2.0 / kw["hidden_size"]),
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        architectures=[architecture],
        **kw,
    )


@dataclass(frozen=True)
class LayerSpec:
    """One layer's attention as vLLM's class for the checkpoint's family builds it."""

    shape: AttentionShape
    qkv_bias: bool
    o_bias: bool


def layer_spec(name: str) -> LayerSpec:
    c = hf_config(name)
    bias = getattr(c, "attention_bias", False)  # LlamaDecoderLayer's getattr: MistralConfig has none
    shape = attention_shape(c.to_dict())
    if family(name) == "qwen2":  # Qwen2Attention: q/k/v biases always, none on o_proj
        return LayerSpec(shape, qkv_bias=True, o_bias=False)
    if family(name) == "qwen3":  # Qwen3Attention: q/k/v biases with attention_bias, none on o_proj
        return LayerSpec(shape, qkv_bias=bias, o_bias=False)
    return LayerSpec(shape, qkv_bias=bias, o_bias=bias)  # Llama, Mistral


def randomize_attention_extras(model) -> None:
    """Give what Hugging Face initialises to constants values that matter.

    Biases start at zero and q_norm/k_norm weights at one: a transform that mishandles
    them would go unnoticed. Biases ~ N(0, 0.5); norm weights log-normal, different per dim.
    """
    import torch

    with torch.no_grad():
        for layer in model.model.layers:
            attn = layer.self_attn
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                bias = getattr(attn, proj).bias
                if bias is not None:
                    bias.normal_(0.0, 0.5)
            for norm in ("q_norm", "k_norm"):
                if hasattr(attn, norm):
                    getattr(attn, norm).weight.copy_(torch.exp(0.5 * torch.randn_like(getattr(attn, norm).weight)))


def build(name: str, root: str, dtype: str = "float32", tokenizer_from: str | None = None, seed: int = 0) -> str:
    """The folder of checkpoint `name` under root, written on first call (seeded: same weights every time)."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = os.path.join(root, f"{name}-{dtype}-seed{seed}")
    done = os.path.join(folder, ".complete")
    if os.path.exists(done):
        return folder
    if tokenizer_from is None:
        from vllm_kvshield.default_model import model_path

        tokenizer_from = str(model_path())
    os.makedirs(folder, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(name)).to(getattr(torch, dtype))
    randomize_attention_extras(model)
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
