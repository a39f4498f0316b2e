"""A small pure-torch Llama forward over the public weights, for the collision attack.

Llama and the families the shield serves: q/k/v biases (Qwen2; Qwen3 and Llama where the
checkpoint has them), Qwen3's per-head q/k RMSNorm before RoPE, Mistral's sliding window.

The attacker needs, for each candidate next token, the K/V that the public model
would cache at some layer given a prefix: one batched step over the candidates
that shares the prefix's cache, stopping at that layer.

    fwd = LlamaForward(PublicModel.load(path))
    state = fwd.prefill(prefix_ids)                     # caches every layer's K/V, logits of the next token
    k, v = fwd.candidate_kv(state, candidates, layer=15)  # [B, H_kv, d] each, K after RoPE (as vLLM caches it)
    state = fwd.extend(state, chosen_token)

fp32 math; RoPE neox; grouped-query attention; SiLU MLP; tied or separate LM head;
a position attends to the last `window` positions (itself included) where the model has a window.
With round_to=torch.bfloat16 every activation a bf16 engine stores (norm outputs,
projections, rotated q/k, attention output, residual stream, MLP) is rounded to bf16:
the attacker's model of a bf16 engine's numerical drift, used to calibrate thresholds.
"""

import functools
from dataclasses import dataclass, field

import torch

from .public_model import PublicModel, head_projection, rms_norm


@dataclass
class PrefixState:
    """The public model's cache for a prefix: per layer K (after RoPE) and V, each [T, H_kv, d]."""

    tokens: list[int] = field(default_factory=list)
    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [V] of the next token


class LlamaForward:
    """Layer-by-layer forward of the public checkpoint (weights loaded once, fp32)."""

    def __init__(self, public: PublicModel, round_to: torch.dtype | None = None):
        self.public = public
        self.shape = public.shape
        self.round_to = round_to

    def _r(self, x: torch.Tensor) -> torch.Tensor:
        """x rounded to the emulated engine dtype (identity without one)."""
        return x if self.round_to is None else x.to(self.round_to).float()

    @functools.cached_property
    def _layers(self) -> list[dict[str, torch.Tensor]]:
        names = (
            "input_layernorm.weight", "post_attention_layernorm.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
        )  # fmt: skip
        return [
            {**{n: self.public.weight(f"layers.{i}.{n}") for n in names}, **self.public.attention_weights(i)}
            for i in range(self.shape.layers)
        ]

    def _attended(self, prefix: torch.Tensor) -> torch.Tensor:
        """The rows of a prefix's cache [T, ...] that the next position attends to besides its own:
        the last window - 1 (all of them without a window)."""
        w = self.shape.window
        return prefix if w is None else prefix[max(0, len(prefix) - (w - 1)) :]

    @functools.cached_property
    def _head(self) -> tuple[torch.Tensor, torch.Tensor]:
        head = self.public.embeddings if self.shape.tied_embeddings else self.public.weight("lm_head.weight")
        return self.public.weight("norm.weight"), head

    def _qkv(self, w: dict, x: torch.Tensor, positions: torch.Tensor):
        """x [N, D] -> q [N, H, d], k [N, H_kv, d] (both after RoPE), v [N, H_kv, d]."""
        s = self.shape
        h = self._r(rms_norm(x, w["input_layernorm.weight"], s.rms_eps))
        q, k, v = (self._r(head_projection(w, part, h, s)) for part in "qkv")
        return self._r(self.public.rotate(q, positions)), self._r(self.public.rotate(k, positions)), v

    def _finish_layer(self, w: dict, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual, o_proj and MLP: attn [N, H, d] -> next hidden [N, D]."""
        r = self._r
        out = r(attn.flatten(1)) @ w["self_attn.o_proj.weight"].T
        if "self_attn.o_proj.bias" in w:
            out = out + w["self_attn.o_proj.bias"]
        x = r(x + r(out))
        h = r(rms_norm(x, w["post_attention_layernorm.weight"], self.shape.rms_eps))
        gate = torch.nn.functional.silu(r(h @ w["mlp.gate_proj.weight"].T))
        return r(x + r(r(gate * r(h @ w["mlp.up_proj.weight"].T)) @ w["mlp.down_proj.weight"].T))

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        norm, head = self._head
        return rms_norm(x, norm, self.shape.rms_eps) @ head.T

    def prefill(self, tokens: list[int]) -> PrefixState:
        """Causal forward over a whole prefix: its per-layer cache and the next-token logits."""
        s = self.shape
        if not tokens:
            raise ValueError("prefill needs at least one token")
        ids = torch.tensor(tokens)
        positions = torch.arange(len(tokens))
        x = self.public.embeddings[ids]
        state = PrefixState(tokens=list(tokens))
        mask = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        if s.window is not None:
            mask = mask.triu(-(s.window - 1))
        for w in self._layers:
            q, k, v = self._qkv(w, x, positions)
            state.k.append(k)
            state.v.append(v)
            group = s.heads // s.kv_heads
            kk, vv = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [T, H, d]
            scores = torch.einsum("thd,shd->hts", q, kk) / s.head_dim**0.5
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            x = self._finish_layer(w, x, torch.einsum("hts,shd->thd", probs, vv))
        state.logits = self._logits(x[-1])
        return state

    def _step(self, state: PrefixState, tokens: torch.Tensor, last_layer: int):
        """One new position for B alternative tokens sharing the prefix; yields (layer, x, k, v) per layer."""
        s = self.shape
        pos = torch.full((len(tokens),), len(state.tokens))
        group = s.heads // s.kv_heads
        x = self.public.embeddings[tokens]  # [B, D]
        for i, w in enumerate(self._layers[: last_layer + 1]):
            q, k, v = self._qkv(w, x, pos)  # q [B, H, d]; k, v [B, H_kv, d]
            yield i, x, k, v
            if i == last_layer:
                return
            pk = self._attended(state.k[i]).repeat_interleave(group, 1)  # [T, H, d] (T: within the window)
            pv = self._attended(state.v[i]).repeat_interleave(group, 1)
            own_k, own_v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [B, H, d]
            scores = torch.cat(
                (torch.einsum("bhd,thd->bht", q, pk), (q * own_k).sum(-1, keepdim=True)), dim=-1
            ) / s.head_dim**0.5  # [B, H, T+1]
            probs = scores.softmax(-1)
            attn = torch.einsum("bht,thd->bhd", probs[..., :-1], pv) + probs[..., -1:] * own_v
            x = self._finish_layer(w, x, attn)

    def candidate_kv(self, state: PrefixState, candidates: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K (after RoPE) and V at `layer` of each candidate placed after the prefix, each [B, H_kv, d]."""
        if not 0 <= layer < self.shape.layers:
            raise ValueError(f"layer {layer} out of range; the model has {self.shape.layers} layers")
        for i, _, k, v in self._step(state, candidates, layer):
            if i == layer:
                return k, v
        raise AssertionError(f"layer {layer} not reached")

    def extend(self, state: PrefixState, token: int) -> PrefixState:
        """The state with one more token: every layer's cache grows, logits of the token after it."""
        out = PrefixState(tokens=[*state.tokens, token], logits=None)
        x = None
        last = self.shape.layers - 1
        for i, x_in, k, v in self._step(state, torch.tensor([token]), last):
            out.k.append(torch.cat((state.k[i], k)))
            out.v.append(torch.cat((state.v[i], v)))
            x = x_in
        # the last layer's output: its attention over the grown cache, then the head
        s, w = self.shape, self._layers[last]
        q, _, _ = self._qkv(w, x, torch.tensor([len(state.tokens)]))
        group = s.heads // s.kv_heads
        kk = torch.cat((self._attended(state.k[last]), out.k[last][-1:])).repeat_interleave(group, 1)
        vv = torch.cat((self._attended(state.v[last]), out.v[last][-1:])).repeat_interleave(group, 1)
        probs = (torch.einsum("bhd,thd->bht", q, kk) / s.head_dim**0.5).softmax(-1)
        x = self._finish_layer(w, x, torch.einsum("bht,thd->bhd", probs, vv))
        out.logits = self._logits(x[0])
        return out
