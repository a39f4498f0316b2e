"""Read a prompt's K/V out of the KV cache tensors vLLM's CPU backend really holds.

What an attacker with a memory dump sees: the per-layer cache tensors, plus the
block table that says which blocks hold a request. Functions here run inside
the worker through `LLM.apply_model` (which needs VLLM_ALLOW_INSECURE_SERIALIZATION=1):

    k, v = kvcache.prompt_kv(llm, prompt_token_ids, layers=[0])   # each [L, T, H_kv, d]

CPU layout (vLLM 0.32): each layer's cache is [num_blocks, H_kv, block_size, 2*d]; each
(block, head) slab holds its slots' K and V at offsets that depend on the attention ISA
(vec/vec16: K dim-major, V slot-major; amx: packed for its tiles), read off vLLM's own
write op by kv_layout.row_offsets. Other ISAs are refused rather than misread.
"""

import functools
import io

import torch

from .. import kv_layout

_records: list[tuple[torch.Tensor, int]] = []  # (block ids, sequence length) of each forward step


def _attention_layers(model) -> list:
    from ..mixed_attention import vllm_attention

    layers = model.model.layers[model.model.start_layer : model.model.end_layer]
    return [vllm_attention(layer.self_attn.attn) for layer in layers]


def start_recording(model) -> None:
    """Record the block table of every single-request forward step from now on."""
    from vllm.forward_context import get_forward_context

    def hook(module, args, kwargs):
        meta = get_forward_context().attn_metadata
        meta = next(iter(meta.values())) if isinstance(meta, dict) else meta
        if meta is not None and len(meta.seq_lens) == 1:
            _records.append((meta.block_table[0].clone(), int(meta.seq_lens[0])))

    if not getattr(model, "_kvshield_recording", False):
        model.register_forward_pre_hook(hook, with_kwargs=True)
        model._kvshield_recording = True
    _records.clear()


def decode_blocks(cache: torch.Tensor, block_ids: torch.Tensor, seq_len: int, offsets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of positions 0..seq_len-1 from one layer's CPU cache tensor, each [T, H_kv, d].

    offsets: [bs, 2d] where each slot's K and V sit inside a (block, head) slab (kv_layout.row_offsets).
    """
    num_blocks, h_kv, block_size, two_d = cache.shape
    d = two_d // 2
    slabs = cache.view(num_blocks, h_kv, block_size * two_d)[block_ids[: (seq_len + block_size - 1) // block_size].long()]
    rows = slabs[:, :, offsets].transpose(1, 2).reshape(-1, h_kv, two_d)[:seq_len]  # [T, H_kv, 2d]
    return rows[..., :d].clone(), rows[..., d:].clone()


def read_last_prompt(model, layers: list[int] | None = None) -> bytes:
    """K, V [L, T, H_kv, d] of the longest recorded step (the prompt), torch.save'd.

    Bytes because vLLM's RPC result path does not decode tensors.
    """
    if not _records:
        raise RuntimeError("no forward step recorded: call start_recording first")
    block_ids, seq_len = max(_records, key=lambda r: r[1])
    attn = _attention_layers(model)
    offsets = kv_layout.cache_offsets(attn[0])
    picked = range(len(attn)) if layers is None else layers
    ks, vs = zip(*(decode_blocks(attn[i].kv_cache, block_ids, seq_len, offsets) for i in picked))
    _records.clear()
    buf = io.BytesIO()
    torch.save((torch.stack(ks), torch.stack(vs)), buf)
    return buf.getvalue()


def prompt_kv(
    llm, prompt_token_ids: list[int], layers: list[int] | None = None, cache_salt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill one prompt on a vllm.LLM and read its K, V [L, T, H_kv, d] back from the cache (in slot order).

    cache_salt: vLLM's tenant salt of the request (mode per-request: the tenant's key).
    """
    from vllm import SamplingParams, TokensPrompt

    salt = {} if cache_salt is None else {"cache_salt": cache_salt}
    llm.apply_model(start_recording)
    llm.generate([TokensPrompt(prompt_token_ids=prompt_token_ids, **salt)], SamplingParams(max_tokens=1), use_tqdm=False)
    raw = llm.apply_model(functools.partial(read_last_prompt, layers=layers))[0]
    return torch.load(io.BytesIO(raw))
