"""Worker extension for benchmarks/rotary_copies.py: plain vLLM Llama whose layers each own a copy
of the rotary module (same table, unpermuted), as a shielded model's layers do; no key, no Ray.

vLLM imports this module in the worker process (`worker_extension_cls`) before it builds the model;
importing it wraps LlamaAttention.__init__ in that process only.
"""

import copy

from vllm.model_executor.models.llama import LlamaAttention

_shared_init = LlamaAttention.__init__


def _init_with_own_rotary(self, *args, **kwargs):
    _shared_init(self, *args, **kwargs)
    shared = self.rotary_emb  # get_rope's one module, shared by every layer
    self.rotary_emb = copy.deepcopy(shared)
    self.rotary_emb.cos_sin_cache = shared.cos_sin_cache.clone()


LlamaAttention.__init__ = _init_with_own_rotary


class PerLayerRotaryCopies:
    """Nothing to add to the worker: importing this module is the change."""

