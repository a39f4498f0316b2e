"""Ablation: the paper's runtime design against ours, per decode step.

KV-Shield as published keeps the permutation in the enclave and un-permutes every layer's
attention output there, every decode step: one enclave round trip per layer per step, in
sequence (layer l+1 needs layer l's result). Here that is a Ray actor call per layer carrying
the attention output [batch, H_q * d] in bf16 and returning it with its columns gathered by the
layer's secret permutation. Our design folds the inverse into W_O at load: nothing extra per
step. The reference cost is W_O's own matmul (o_proj, [batch, H_q * d] x [H_q * d, hidden]),
which runs in both designs; the in-process gather shows what the un-permutation itself costs.

    with RayCluster():
        result = run(shape, layers=30, batches=(1, 32), steps=100)
"""

import time

import ray
import torch

from . import stats
from ..transforms import AttentionShape

WARMUP_STEPS = 3


class Unpermuter:
    """The paper's enclave at run time: holds each layer's output permutation, un-permutes on request."""

    def __init__(self, layers: int, width: int, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.inverse = [torch.argsort(torch.randperm(width, generator=generator)) for _ in range(layers)]

    def unpermute(self, layer: int, attn_out: torch.Tensor) -> torch.Tensor:
        return attn_out[:, self.inverse[layer]]  # [B, H_q * d]


def _per_step(step, steps: int) -> list[float]:
    """Seconds of each of `steps` calls of step(), after WARMUP_STEPS untimed ones."""
    for _ in range(WARMUP_STEPS):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def run(shape: AttentionShape, layers: int, batches: tuple[int, ...], steps: int, seed: int = 0) -> dict:
    """Per batch size: seconds per decode step of the actor round trips, of o_proj, of the local gather."""
    width = shape.num_heads * shape.head_dim
    actor = ray.remote(Unpermuter).options(num_cpus=0).remote(layers, width, seed)
    local = Unpermuter(layers, width, seed)
    generator = torch.Generator().manual_seed(seed)
    w_o = (torch.randn(shape.hidden_size, width, generator=generator) / width**0.5).to(torch.bfloat16)  # [hidden, H_q*d]
    out = {}
    try:
        for batch in batches:
            x = torch.randn(batch, width, generator=generator).to(torch.bfloat16)  # [B, H_q*d]

            def round_trips():
                y = x
                for layer in range(layers):
                    y = ray.get(actor.unpermute.remote(layer, y))
                return y

            def o_proj():
                for _ in range(layers):
                    torch.nn.functional.linear(x, w_o)

            def gather():
                for layer in range(layers):
                    local.unpermute(layer, x)

            assert torch.equal(round_trips(), _reference(local, x, layers)), "actor un-permutation differs from local"
            trips, matmul, index = _per_step(round_trips, steps), _per_step(o_proj, steps), _per_step(gather, steps)
            step_s = stats.median(trips)
            out[str(batch)] = {
                "batch": batch,
                "layers": layers,
                "attn_out_shape": [batch, width],
                "paper_round_trips_per_step_s": step_s,
                "paper_round_trip_per_layer_s": step_s / layers,
                "paper_extra_per_token_s": step_s / batch,
                "paper_round_trips_spread_s": stats.spread(trips),
                "folded_extra_per_step_s": 0.0,
                "o_proj_per_step_s": stats.median(matmul),
                "local_gather_per_step_s": stats.median(index),
                "round_trips_over_o_proj": step_s / stats.median(matmul),
                "steps": steps,
            }
    finally:
        ray.kill(actor)
    return out


def _reference(local: Unpermuter, x: torch.Tensor, layers: int) -> torch.Tensor:
    for layer in range(layers):
        x = local.unpermute(layer, x)
    return x


def add_decode_reference(result: dict, decode_step_s: dict[int, float]) -> None:
    """Relate the round trips to plain vLLM's measured decode step at each batch size."""
    for entry in result.values():
        step = decode_step_s.get(entry["batch"])
        if step is not None:
            entry["plain_decode_step_s"] = step
            entry["paper_slowdown_per_step"] = (step + entry["paper_round_trips_per_step_s"]) / step
