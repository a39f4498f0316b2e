"""KVShieldLlamaForCausalLM: vLLM's Llama whose attention weights pass through the enclave at load.

Registered for every architecture name vLLM maps to its Llama code. Without the
kvshield config it is vLLM's LlamaForCausalLM, unchanged. With it:
  - each layer owns a copy of vLLM's rotary module, its table permuted at load;
  - the checkpoint's q/k/v/o tensors go to the enclave before vLLM shards them;
  - mode "mix" applies the runtime K/Q mix after RoPE;
  - mode "per-request" mixes each token's q, k, v with its own request's matrices around
    vLLM's attention (request_mix.py, rows kept by request_keys.py) and, after each step,
    moves the rows the step wrote to random slots of their blocks (cache_shuffle.py).

    python -m vllm.entrypoints.openai.api_server --model PATH \\
        --additional-config '{"kvshield": {"mode": "mix"}}'
"""

import copy
import functools
import logging
import re
from collections.abc import Iterable, Iterator

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.rotary_embedding import (
    DynamicNTKScalingRotaryEmbedding,
    LinearScalingRotaryEmbedding,
    Llama3RotaryEmbedding,
    RotaryEmbedding,
    YaRNScalingRotaryEmbedding,
)
from vllm.model_executor.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from . import cache_shuffle, enclave, registered_architectures, request_keys, request_mix
from .config import ShieldConfig, ShieldConfigError, ShieldError, check_supported
from .shield_status import ShieldStatus
from .transforms import ATTENTION_BIASES, ATTENTION_WEIGHTS, AttentionShape, DeviceMaterial, mix_qk, permute_rotary_cache

logger = logging.getLogger("vllm.plugins.kvshield")  # under "vllm": vLLM's handlers and format

# Rotary classes whose whole state is a static cos/sin table: exact type, not subclasses.
SUPPORTED_ROPES = (
    RotaryEmbedding,
    LinearScalingRotaryEmbedding,
    Llama3RotaryEmbedding,
    YaRNScalingRotaryEmbedding,
    DynamicNTKScalingRotaryEmbedding,
)
# checkpoint names of one layer's attention tensors
ATTENTION_TENSOR = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.self_attn\.)(?P<name>"
    + "|".join(map(re.escape, ATTENTION_WEIGHTS + ATTENTION_BIASES))
    + ")$"
)
IGNORED_ATTENTION_TENSORS = ("rotary_emb.inv_freq",)  # old checkpoints carry it; vLLM skips it too


def local_kv_heads(total_kv_heads: int) -> torch.Tensor:
    """Indices of the KV heads this tensor-parallel rank holds (as QKVParallelLinear shards them)."""
    rank, size = get_tensor_model_parallel_rank(), get_tensor_model_parallel_world_size()
    if total_kv_heads >= size:
        per_rank = total_kv_heads // size
        return torch.arange(rank * per_rank, (rank + 1) * per_rank)
    return torch.tensor([rank // (size // total_kv_heads)])


class ShieldedLlamaAttention(LlamaAttention):
    """LlamaAttention with its own rotary table and, after RoPE, in mode "mix" k'' = k' M, q'' = q' M^{-T},
    in mode "per-request" each token's request's mix of q, k, v and un-mix of the attention output."""

    def __init__(self, *args, runtime_mix: bool, per_request: bool, max_model_len: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.layer_index = extract_layer_index(kwargs["prefix"])
        self.per_request = per_request
        shared = self.rotary_emb
        if type(shared) not in SUPPORTED_ROPES:
            names = ", ".join(c.__name__ for c in SUPPORTED_ROPES)
            raise ShieldConfigError(f"kvshield: rotary embedding {type(shared).__name__} is not supported; accepted: {names}")
        if shared.rotary_dim != self.head_dim:
            raise ShieldConfigError(
                f"kvshield: partial rotary (rotary_dim={shared.rotary_dim}, head_dim={self.head_dim}) is not supported"
            )
        # get_rope shares one module across layers: own a copy of vLLM's module (so rope
        # scaling stays vLLM's), holding only the positions this server can reach.
        self._plain_table = shared.cos_sin_cache[:max_model_len]  # [P, d]: cos | sin
        self.rotary_emb = copy.deepcopy(shared)
        self.rotary_emb.cos_sin_cache = self._plain_table.clone()
        if runtime_mix:  # [H_kv local, d, d] M_h and M_h^{-T}, filled at load
            d = self.head_dim
            self.register_buffer("qk_mix", torch.zeros(self.num_kv_heads, d, d), persistent=False)
            self.register_buffer("qk_mix_q", torch.zeros(self.num_kv_heads, d, d), persistent=False)
        else:
            self.qk_mix = self.qk_mix_q = None

    def install(self, material: DeviceMaterial) -> None:
        """Put one layer's device material in place: permuted rotary table, runtime mix."""
        pairs = material.pairs.to(self._plain_table.device)
        self.rotary_emb.cos_sin_cache = permute_rotary_cache(self._plain_table, pairs)
        if self.qk_mix is not None:
            heads = local_kv_heads(self.total_num_kv_heads)
            self.qk_mix.copy_(material.mix[heads])
            self.qk_mix_q.copy_(material.mix_q[heads])

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.qk_mix is None and not self.per_request:
            return super().forward(positions, hidden_states)
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        if self.qk_mix is not None:
            q, k = mix_qk(q, k, self.qk_mix, self.qk_mix_q)
        if not self.per_request:
            output, _ = self.o_proj(self.attn(q, k, v))
            return output
        q, k, v = torch.ops.kvshield.request_mix(q, k, v, self.layer_index, self.num_kv_heads)
        o = torch.ops.kvshield.request_unmix(self.attn(q, k, v), self.layer_index, self.num_kv_heads)
        output, _ = self.o_proj(o)
        return output


class KVShieldLlamaForCausalLM(LlamaForCausalLM):
    """vLLM's Llama; with additional_config["kvshield"], its KV cache holds only transformed K/V."""

    def __init__(self, *, vllm_config, prefix: str = "", layer_type=LlamaDecoderLayer):
        shield = ShieldConfig.from_vllm_config(vllm_config)
        if shield is not None:
            check_supported(vllm_config, registered_architectures())
            attention = functools.partial(
                ShieldedLlamaAttention,
                runtime_mix=shield.mode == "mix",
                per_request=shield.mode == "per-request",
                max_model_len=vllm_config.model_config.max_model_len,
            )
            if shield.mode == "per-request":
                request_mix.register_ops()
            layer_type = functools.partial(layer_type, attn_layer_type=attention)
        super().__init__(vllm_config=vllm_config, prefix=prefix, layer_type=layer_type)
        self.shield = shield
        self.enclave_name = enclave.enclave_name(vllm_config) if shield else None
        # Held for the model's life: Ray ends a non-detached actor once no handle to it is
        # left, so a worker dropping it after load would kill the enclave under a slower worker.
        self.enclave_handle = None
        self.shielded_layers: set[int] = set()
        self._dtype = vllm_config.model_config.dtype
        self._max_rows = vllm_config.scheduler_config.max_num_seqs  # rows of vLLM's persistent batch

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.shield is None:
            return super().load_weights(weights)
        handle = self.enclave_handle = enclave.connect(self.shield, self.enclave_name)
        self.shielded_layers = set()
        loaded = super().load_weights(self._through_enclave(weights, handle))
        local = set(range(self.model.start_layer, self.model.end_layer))
        if self.shielded_layers != local:
            missing = sorted(local - self.shielded_layers)
            raise ShieldError(f"kvshield: layers {missing} got no attention weights through the enclave; refusing to serve")
        if self.shield.mode == "per-request":
            self._install_request_rows(handle)
        info = enclave.call(handle, "info")
        logger.info("%s", ShieldStatus(info["mode"], len(self.shielded_layers), info["fingerprint"]).log_line())
        return loaded

    def _install_request_rows(self, handle) -> None:
        """This worker's per-request matrices, one row per batch row (mode per-request)."""
        attn = self.model.layers[self.model.start_layer].self_attn
        rows = request_keys.RequestKeyRows(
            layers=range(self.model.start_layer, self.model.end_layer),
            kv_heads=local_kv_heads(attn.total_num_kv_heads).tolist(),
            head_dim=attn.head_dim,
            max_rows=self._max_rows,
            dtype=self._dtype,
            device=next(self.parameters()).device,
            seeds=functools.partial(enclave.request_seeds, handle),
        )
        request_keys.install(rows)
        logger.info("kvshield: per-request matrices: %.2f MiB per request in the batch (up to %d)", rows.row_bytes / 2**20, self._max_rows)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.shield is None or self.shield.mode != "per-request":
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        meta = self._attention_metadata()
        plan = None
        if meta is not None and request_keys.current().key_ids:  # else: warm-up or profiling, no request
            starts = meta.query_start_loc.tolist()
            plan = request_mix.StepPlan.from_query_start_loc(starts)
            if not request_keys.current().occupied(plan.num_rows):
                raise ShieldError(f"kvshield: batch rows {plan.num_rows} have no request matrices (rows {sorted(request_keys.current().key_ids)}); refusing to compute unmixed")
        request_mix.begin_step(plan)
        try:
            out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            request_mix.begin_step(None)
        if plan is not None:
            caches = [self.model.layers[i].self_attn.attn.kv_cache for i in range(self.model.start_layer, self.model.end_layer)]
            cache_shuffle.shuffle_step(caches, starts, meta.seq_lens.tolist(), meta.block_table, cache_shuffle.fresh_generator())
        return out

    def _attention_metadata(self):
        """This step's attention metadata (one KV cache group: every layer shares it), None outside a step."""
        meta = get_forward_context().attn_metadata
        if isinstance(meta, dict):
            meta = next(iter(meta.values()), None)
        return meta

    def _shape(self) -> AttentionShape:
        attn = self.model.layers[self.model.start_layer].self_attn
        return AttentionShape(
            num_heads=attn.total_num_heads,
            num_kv_heads=attn.total_num_kv_heads,
            head_dim=attn.head_dim,
            hidden_size=attn.hidden_size,
            neox=attn.rotary_emb.is_neox_style,
        )

    def _expected(self, layer: int) -> set[str]:
        attn = self.model.layers[layer].self_attn
        qkv_bias, o_bias = attn.qkv_proj.bias is not None, attn.o_proj.bias is not None
        biases = {name for name in ATTENTION_BIASES if (o_bias if name.startswith("o_proj") else qkv_bias)}
        return set(ATTENTION_WEIGHTS) | biases

    def _through_enclave(self, weights, handle) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass the checkpoint through, swapping each layer's attention tensors for the enclave's.

        Buffers at most one layer's attention tensors (checkpoints store a layer's keys together).
        """
        shape = self._shape()
        pending: dict[int, dict[str, torch.Tensor]] = {}
        prefixes: dict[int, str] = {}
        for name, tensor in weights:
            m = ATTENTION_TENSOR.match(name)
            if m is None:
                if ".self_attn." in name and not name.endswith(IGNORED_ATTENTION_TENSORS):
                    raise ShieldError(f"kvshield: unexpected attention tensor {name!r} in the checkpoint")
                yield name, tensor
                continue
            layer = int(m["layer"])
            if not self.model.start_layer <= layer < self.model.end_layer:
                continue  # another pipeline stage owns this layer
            expected = self._expected(layer)
            if m["name"] not in expected:
                raise ShieldError(f"kvshield: checkpoint has {name!r}, the model expects only {sorted(expected)}")
            pending.setdefault(layer, {})[m["name"]] = tensor
            prefixes[layer] = m["prefix"]
            if set(pending[layer]) == expected:
                out, material = enclave.transform(handle, layer, shape, pending.pop(layer), self._dtype)
                self.model.layers[layer].self_attn.install(material)
                self.shielded_layers.add(layer)
                for short, t in out.items():
                    yield prefixes[layer] + short, t
        if pending:
            incomplete = {layer: sorted(self._expected(layer) - set(t)) for layer, t in pending.items()}
            raise ShieldError(f"kvshield: checkpoint lacks attention tensors {incomplete}; refusing to serve")


def shield_status(model) -> dict:
    """What a worker's model says about its shield (run through LLM.apply_model): its class and its ShieldStatus."""
    shielded = isinstance(model, KVShieldLlamaForCausalLM) and model.shield is not None
    status = ShieldStatus(model.shield.mode, len(model.shielded_layers)) if shielded else ShieldStatus.off()
    return {
        "model_class": type(model).__name__,
        "enabled": status.enabled,
        "mode": status.mode,
        "layers_shielded": status.layers,
    }
