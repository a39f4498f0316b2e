"""Shielded variants of vLLM's Llama, Qwen2, Qwen3 and Mistral: attention weights pass through the enclave at load.

Each KVShield<class> is vLLM's class with ShieldedModel mixed in, registered for every
architecture name vLLM maps to that class (families.FAMILIES). Without the kvshield config it
is vLLM's class, unchanged. With it, once vLLM has built the model:
  - each layer's attention gets a copy of vLLM's rotary module, its table permuted (and, for
    Qwen3's q/k norm, turned) at load;
  - modes "mix" and "per-request" put each layer's vLLM Attention behind MixedAttention
    (the runtime maps after RoPE);
  - the checkpoint's q/k/v/o tensors (and Qwen3's q_norm/k_norm weights) go to the enclave,
    one call per layer, before vLLM's loaders shard them;
  - mode "per-request": each step's tokens are laid out by request (request_mix.StepPlan,
    matrices kept by request_keys.py), and after each layer's attention the rows the step wrote
    there move to random slots of their blocks (cache_shuffle.py), on a thread beside the model
    when a core is spare and the step's matrices exceed the last-level cache (side_thread.py),
    done before the step returns.
The families' attention forwards stay vLLM's: they call self.rotary_emb and self.attn.

    python -m vllm.entrypoints.openai.api_server --model Qwen/Qwen3-0.6B \\
        --additional-config '{"kvshield": {"mode": "mix"}}'
"""

import copy
import functools
import logging
import re
from collections.abc import Iterable, Iterator

import numpy as np
import torch
from torch import nn
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.rotary_embedding import (
    DynamicNTKScalingRotaryEmbedding,
    LinearScalingRotaryEmbedding,
    Llama3RotaryEmbedding,
    RotaryEmbedding,
    YaRNScalingRotaryEmbedding,
)
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from . import cache_shuffle, enclave, kernels, kv_layout, registered_families, request_keys, request_mix
from .config import ShieldConfig, ShieldConfigError, ShieldError, check_supported
from .families import FAMILIES_BY_CLASS, Family
from .mixed_attention import MixedAttention, vllm_attention
from .shield_status import ShieldStatus
from .side_thread import SideThread, last_level_cache_bytes
from .transforms import ATTENTION_BIASES, ATTENTION_WEIGHTS, QK_NORM_WEIGHTS, AttentionShape, DeviceMaterial, shielded_rotary_cache

logger = logging.getLogger("vllm.plugins.kvshield")  # under "vllm": vLLM's handlers and format

# Rotary classes whose whole state is a static cos/sin table: exact type, not subclasses
# (families.SUPPORTED_ROPE_TYPES refuses the others before vLLM starts; this is the worker's check).
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
    + "|".join(map(re.escape, ATTENTION_WEIGHTS + ATTENTION_BIASES + QK_NORM_WEIGHTS))
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


def shield_attention(attn: nn.Module, family: Family, mode: str, layer: int, max_model_len: int) -> None:
    """Make one layer's attention module (LlamaAttention, Qwen2Attention, ...) ready for its device material.

    Its rotary module becomes a copy of its own (vLLM's get_rope shares one across layers), holding
    only the positions this server can reach; in modes "mix" and "per-request" its Attention goes
    behind MixedAttention. layer: the layer's global index.
    """
    shared = attn.rotary_emb
    if type(shared) not in SUPPORTED_ROPES:
        names = ", ".join(c.__name__ for c in SUPPORTED_ROPES)
        raise ShieldConfigError(f"kvshield: rotary embedding {type(shared).__name__} is not supported; accepted: {names}")
    if shared.rotary_dim != attn.head_dim:
        raise ShieldConfigError(
            f"kvshield: partial rotary (rotary_dim={shared.rotary_dim}, head_dim={attn.head_dim}) is not supported"
        )
    if hasattr(attn, "k_norm") != family.qk_norm:
        raise ShieldConfigError(
            f"kvshield: {family.name}'s attention {'has' if hasattr(attn, 'k_norm') else 'lacks'} q/k norms; "
            "the shield's transform for this family assumes the opposite"
        )
    rotary = copy.deepcopy(shared)
    rotary.kvshield_plain_table = shared.cos_sin_cache[:max_model_len]  # [P, d]: cos | sin
    rotary.cos_sin_cache = rotary.kvshield_plain_table.clone()
    attn.rotary_emb = rotary
    if mode in ("mix", "per-request"):
        request_layer = layer if mode == "per-request" else None
        attn.attn = MixedAttention(attn.attn, attn.num_kv_heads, attn.head_dim, static_mix=mode == "mix", request_layer=request_layer)


def install(attn: nn.Module, material: DeviceMaterial) -> None:
    """Put one layer's device material in place: its rotary table, and in mode "mix" this rank's M_h."""
    rotary = attn.rotary_emb
    rotary.cos_sin_cache = shielded_rotary_cache(rotary.kvshield_plain_table, material)
    mixed = isinstance(attn.attn, MixedAttention) and attn.attn.static_mix
    if mixed != (material.mix is not None):
        raise ShieldError(f"kvshield: the enclave's material (mix={material.mix is not None}) does not fit this layer")
    if mixed:
        heads = local_kv_heads(attn.total_num_kv_heads)
        attn.attn.install(material.mix[heads], material.mix_q[heads])


class ShieldedModel:
    """Mixed into one of vLLM's model classes: with additional_config["kvshield"], its KV cache holds only transformed K/V."""

    family: Family  # set by each KVShield<class>

    def __init__(self, *, vllm_config, prefix: str = "", **kwargs):
        shield = ShieldConfig.from_vllm_config(vllm_config)
        if shield is not None:
            check_supported(vllm_config, registered_families())
            if shield.mode == "per-request":
                request_mix.register_ops()
        super().__init__(vllm_config=vllm_config, prefix=prefix, **kwargs)
        self.shield = shield
        self.enclave_name = enclave.enclave_name(vllm_config) if shield else None
        # Held for the model's life: Ray ends a non-detached actor once no handle to it is
        # left, so a worker dropping it after load would kill the enclave under a slower worker.
        self.enclave_handle = None
        self.shielded_layers: set[int] = set()
        self._dtype = vllm_config.model_config.dtype
        self._max_rows = vllm_config.scheduler_config.max_num_seqs  # rows of vLLM's persistent batch
        if shield is not None:
            for layer in self._local_layers():
                shield_attention(
                    self.model.layers[layer].self_attn,
                    self.family,
                    shield.mode,
                    layer,
                    max_model_len=vllm_config.model_config.max_model_len,
                )

    def _local_layers(self) -> range:
        return range(self.model.start_layer, self.model.end_layer)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if self.shield is None:
            return super().load_weights(weights)
        handle = self.enclave_handle = enclave.connect(self.shield, self.enclave_name)
        self.shielded_layers = set()
        loaded = super().load_weights(self._through_enclave(weights, handle))
        local = set(self._local_layers())
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
        layers, kv_heads = list(self._local_layers()), local_kv_heads(attn.total_num_kv_heads).tolist()
        rows = request_keys.RequestKeyRows(
            layers=layers,
            kv_heads=kv_heads,
            head_dim=attn.head_dim,
            max_rows=self._max_rows,
            dtype=self._dtype,
            device=next(self.parameters()).device,
            materials=enclave.material_fetch(handle, layers, kv_heads, attn.head_dim, self._dtype, self.shield.fetch_ahead),
        )
        request_keys.install(rows)
        kernels.compile_for(self._dtype)  # numba compiles (or loads its cache) here, not in the first step
        logger.info("kvshield: per-request matrices: %.2f MiB per request in the batch (up to %d)", rows.row_bytes / 2**20, self._max_rows)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None):
        if self.shield is None or self.shield.mode != "per-request":
            return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        meta = self._attention_metadata()
        plan = moves = shuffle = side = None
        if meta is not None and request_keys.current().key_ids:  # else: warm-up or profiling, no request
            starts = meta.query_start_loc.tolist()
            plan = request_mix.StepPlan.from_query_start_loc(starts)
            if not request_keys.current().occupied(plan.num_rows):
                raise ShieldError(f"kvshield: batch rows {plan.num_rows} have no request matrices (rows {sorted(request_keys.current().key_ids)}); refusing to compute unmixed")
            attns = self._attentions
            _, heads, block_size, _ = attns[0].kv_cache.shape
            moves = cache_shuffle.plan_step(starts, meta.seq_lens.tolist(), meta.block_table, block_size, heads, len(attns),
                                            cache_shuffle.fresh_generator())
            if moves is not None:  # offsets [bs, 2d]: probed at the first step, then cached
                if plan.num_rows * request_keys.current().row_bytes > self._side_from_bytes:
                    side = self._side_thread
                shuffle = functools.partial(self._shuffle_layer, side, moves, attns, kv_layout.cache_offsets(attns[0]).numpy(),
                                            plan.num_rows)
        request_mix.begin_step(plan, shuffle)
        try:
            out = super().forward(input_ids, positions, intermediate_tensors, inputs_embeds)
        finally:
            request_mix.begin_step(None)
            if side is not None:  # the moves it was handed are done before the step returns
                side.wait()
        if moves is not None and moves.pending:
            raise ShieldError(f"kvshield: layers {sorted(moves.pending)} ran without moving the rows they wrote; refusing to continue")
        return out

    @functools.cached_property
    def _attentions(self) -> list:
        """vLLM's Attention layer (it holds kv_cache) of each local layer, in order."""
        return [vllm_attention(self.model.layers[i].self_attn.attn) for i in self._local_layers()]

    @functools.cached_property
    def _side_thread(self) -> SideThread | None:
        """The thread that moves rows beside the model, on a core it does not compute on (None: none spare)."""
        return SideThread.off_compute_cores()

    @functools.cached_property
    def _side_from_bytes(self) -> int:
        """A step whose matrices exceed this (the last-level cache) moves rows on the side thread (side_thread.py)."""
        return last_level_cache_bytes()

    def _shuffle_layer(self, side: SideThread | None, moves: cache_shuffle.StepMoves, attns: list, offsets: np.ndarray,
                       rows: int, layer: int) -> None:
        """Right after a layer's attention (request_unmix): the rows the step wrote there move, on the side thread
        while the model computes the next layers (side_thread.py), else here while they are still in cache. The side
        thread then reads the next layer's matrices of the step's `rows` batch rows, so that layer's mix finds them
        in the cache the cores share rather than in memory."""
        position = layer - self.model.start_layer
        if side is None:
            moves.apply(position, attns[position].kv_cache, offsets)
            return
        ahead = request_keys.current().layer(layer + 1)[:, :rows] if position + 1 < len(attns) else None  # [4, R, H, d, d]
        side.submit(_move_and_read_ahead, moves, position, attns[position].kv_cache, offsets, ahead)

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
            qk_norm=self.family.qk_norm,
        )

    def _expected(self, layer: int) -> set[str]:
        attn = self.model.layers[layer].self_attn
        qkv_bias, o_bias = attn.qkv_proj.bias is not None, attn.o_proj.bias is not None
        biases = {name for name in ATTENTION_BIASES if (o_bias if name.startswith("o_proj") else qkv_bias)}
        return set(ATTENTION_WEIGHTS) | biases | (set(QK_NORM_WEIGHTS) if self.family.qk_norm else set())

    def _through_enclave(self, weights, handle) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass the checkpoint through, swapping each layer's attention tensors for the enclave's.

        Buffers at most one layer's attention tensors (checkpoints store a layer's keys together).
        Hugging Face names only: a tensor under another name (Mistral's consolidated `attention.wq`, which
        load_format "mistral" would bring; refused) passes untransformed, and then its layer is missing
        from shielded_layers, which load_weights refuses.
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
                install(self.model.layers[layer].self_attn, material)
                self.shielded_layers.add(layer)
                for short, t in out.items():
                    yield prefixes[layer] + short, t
        if pending:
            incomplete = {layer: sorted(self._expected(layer) - set(t)) for layer, t in pending.items()}
            raise ShieldError(f"kvshield: checkpoint lacks attention tensors {incomplete}; refusing to serve")


class KVShieldLlamaForCausalLM(ShieldedModel, LlamaForCausalLM):
    family = FAMILIES_BY_CLASS["LlamaForCausalLM"]


class KVShieldQwen2ForCausalLM(ShieldedModel, Qwen2ForCausalLM):
    family = FAMILIES_BY_CLASS["Qwen2ForCausalLM"]


class KVShieldQwen3ForCausalLM(ShieldedModel, Qwen3ForCausalLM):
    family = FAMILIES_BY_CLASS["Qwen3ForCausalLM"]


class KVShieldMistralForCausalLM(ShieldedModel, MistralForCausalLM):
    family = FAMILIES_BY_CLASS["MistralForCausalLM"]


def _move_and_read_ahead(moves: cache_shuffle.StepMoves, position: int, cache: torch.Tensor, offsets: np.ndarray,
                         ahead: torch.Tensor | None) -> None:
    """On the side thread: one layer's row moves, then the next layer's matrices [4, R, H, d, d] read into the cache."""
    moves.apply(position, cache, offsets)
    for part in () if ahead is None else ahead:
        kernels.touch(part)


def shield_status(model) -> dict:
    """What a worker's model says about its shield (run through LLM.apply_model): its class and its ShieldStatus."""
    shielded = isinstance(model, ShieldedModel) and model.shield is not None
    status = ShieldStatus(model.shield.mode, len(model.shielded_layers)) if shielded else ShieldStatus.off()
    return {
        "model_class": type(model).__name__,
        "enabled": status.enabled,
        "mode": status.mode,
        "layers_shielded": status.layers,
    }
