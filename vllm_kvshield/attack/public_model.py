"""What the attacker computes from the public checkpoint alone: layer-0 K/V tables and RoPE.

The checkpoint folder (config.json, model.safetensors, tokenizer) is public; the
key is not. Layer 0's K and V depend on the token only (K also on its position,
through RoPE), so every vocabulary token's K/V is computable. Families: Llama,
Qwen2 and Mistral (q/k/v biases where the checkpoint has them) and Qwen3 (q/k
biases too, and a per-head RMSNorm on q and k before RoPE):

    pub = PublicModel.load("~/.cache/vllm-kvshield/SmolLM2-135M-Instruct")
    k0, v0 = pub.layer0_k, pub.layer0_v          # [V, H_kv, d] each; k0 before RoPE
    k_plain = pub.rotate(k0[ids], positions)     # what plain vLLM caches at those positions
"""

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_kvshield.families import sliding_window
from vllm_kvshield.hf_config import attention_shape

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")


@dataclass(frozen=True)
class ModelShape:
    """The geometry of a checkpoint that the attacks need."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rope_theta: float
    rms_eps: float
    tied_embeddings: bool
    qk_norm: bool = False  # Qwen3: q and k of each head RMS-normed (weight [d]) before RoPE
    window: int | None = None  # sliding window (Mistral): a position attends to the last `window` positions

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        rope = cfg.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default" or cfg.get("rope_scaling"):
            raise ValueError(f"rope scaling {rope or cfg.get('rope_scaling')!r} is not modelled; accepted: plain RoPE")
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        attention = attention_shape(cfg)
        return cls(
            vocab=cfg["vocab_size"],
            hidden=cfg["hidden_size"],
            layers=cfg["num_hidden_layers"],
            heads=attention.num_heads,
            kv_heads=attention.num_kv_heads,
            head_dim=attention.head_dim,
            rope_theta=float(theta),
            rms_eps=float(cfg["rms_norm_eps"]),
            tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qk_norm=attention.qk_norm,
            window=sliding_window(cfg),
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in fp32: x / rms(x) * weight."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def head_projection(w: dict[str, torch.Tensor], part: str, x: torch.Tensor, shape: "ModelShape") -> torch.Tensor:
    """q, k or v (before RoPE) of normed inputs x [..., D]: [..., H or H_kv, d].

    w: one layer's tensors by name ("self_attn.k_proj.weight", optional ".bias", Qwen3's "self_attn.k_norm.weight").
    """
    y = x @ w[f"self_attn.{part}_proj.weight"].T
    bias = w.get(f"self_attn.{part}_proj.bias")
    if bias is not None:
        y = y + bias
    y = y.unflatten(-1, (shape.heads if part == "q" else shape.kv_heads, shape.head_dim))
    norm = w.get(f"self_attn.{part}_norm.weight")
    return y if norm is None else rms_norm(y, norm, shape.rms_eps)


class PublicModel:
    """Public weights of a checkpoint, read lazily from its safetensors, all math in fp32."""

    def __init__(self, folder: Path, shape: ModelShape):
        self.folder = folder
        self.shape = shape
        self._files = sorted(folder.glob("*.safetensors"))
        if not self._files:
            raise FileNotFoundError(f"no *.safetensors in {folder}")
        self._index = {}
        for path in self._files:
            with safe_open(str(path), "pt") as f:
                self._index.update({name: path for name in f.keys()})

    @classmethod
    def load(cls, folder: str | Path) -> "PublicModel":
        folder = Path(folder).expanduser()
        cfg = json.loads((folder / "config.json").read_text())
        if cfg.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"model_type {cfg.get('model_type')!r} in {folder}; accepted: {', '.join(MODEL_TYPES)}")
        return cls(folder, ModelShape.from_config(cfg))

    def has(self, name: str) -> bool:
        return name in self._index or f"model.{name}" in self._index

    def weight(self, name: str) -> torch.Tensor:
        """One checkpoint tensor as fp32 (the prefix `model.` is optional)."""
        full = name if name in self._index else f"model.{name}"
        if full not in self._index:
            raise KeyError(f"{name!r} is not in the checkpoint at {self.folder}")
        with safe_open(str(self._index[full]), "pt") as f:
            return f.get_tensor(full).float()

    @functools.cached_property
    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))

    @functools.cached_property
    def embeddings(self) -> torch.Tensor:
        return self.weight("embed_tokens.weight")  # [V, D]

    @functools.cached_property
    def inv_freq(self) -> torch.Tensor:
        """RoPE frequency of each rotary pair (neox pairs (i, i + d/2)), fp64, [d/2]."""
        d = self.shape.head_dim
        return 1.0 / (self.shape.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))

    def layer_input(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """The normed input of a layer's attention, [..., D]."""
        return rms_norm(hidden, self.weight(f"layers.{layer}.input_layernorm.weight"), self.shape.rms_eps)

    def attention_weights(self, layer: int, parts: str = "qkvo") -> dict[str, torch.Tensor]:
        """A layer's projection weights of `parts`, with the biases and q/k norm weights the checkpoint has."""
        names = [f"self_attn.{p}_proj.{t}" for p in parts for t in ("weight", "bias")]
        names += [f"self_attn.{p}_norm.weight" for p in parts if p in "qk"]
        return {n: self.weight(f"layers.{layer}.{n}") for n in names if self.has(f"layers.{layer}.{n}")}

    def project_kv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k (before RoPE) and v of normed inputs x [..., D], each [..., H_kv, d]."""
        w = self.attention_weights(layer, "kv")
        return head_projection(w, "k", x, self.shape), head_projection(w, "v", x, self.shape)

    @functools.cached_property
    def _layer0(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.project_kv(0, self.layer_input(0, self.embeddings))

    @property
    def layer0_k(self) -> torch.Tensor:
        """Every vocabulary token's layer-0 K before RoPE, [V, H_kv, d]."""
        return self._layer0[0]

    @property
    def layer0_v(self) -> torch.Tensor:
        """Every vocabulary token's layer-0 V, [V, H_kv, d]."""
        return self._layer0[1]

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = positions.double()[:, None] * self.inv_freq[None]  # [T, d/2]
        return angle.cos().float()[:, None], angle.sin().float()[:, None]  # [T, 1, d/2]

    def rotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """RoPE (neox) at the given positions: k [T, H, d] -> [T, H, d], as vLLM caches it."""
        cos, sin = self._cos_sin(positions)
        a, b = k.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)

    def unrotate(self, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Inverse of rotate: the K vLLM cached at those positions, before RoPE."""
        cos, sin = self._cos_sin(positions)
        a, b = k.chunk(2, dim=-1)
        return torch.cat((a * cos + b * sin, b * cos - a * sin), dim=-1)
