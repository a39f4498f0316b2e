"""Our engine's KV blocks in the format of KV-Cloak's published attack code (github SiO-2/kvcloak).

Its attack/inversion.py and attack/collision.py read a `past_key_values.pt`: per layer a
(K, V) pair, each [1, H_kv, T, head_dim], K after RoPE (transformers' legacy cache). Next
to it we write meta.json: the request's tokens, its private positions, the mode and the
layout (rows are as stored: where a mode shuffles them, in block order, not positions).

    write_dump(Path("/tmp/dumps/mix/0"), obs, req, "mix")       # obs read at every layer
    k, v = read_dump(Path("/tmp/dumps/mix/0"))[0]               # layer 0
    scripts/kvcloak_attack.sh /path/to/kvcloak /tmp/dumps        # runs KV-Cloak's own code on them
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from .observation import Observation
from .requests import Request

CACHE_FILE = "past_key_values.pt"
META_FILE = "meta.json"


def to_legacy_cache(obs: Observation) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    """Observation k, v [L, T, H, d] (every layer, in order) -> per layer (k, v) each [1, H, T, d]."""
    if obs.layers != tuple(range(len(obs.layers))):
        raise ValueError(f"a KV-Cloak dump holds every layer from 0 in order, got layers {obs.layers}")
    return tuple((obs.k[i].transpose(0, 1)[None].contiguous(), obs.v[i].transpose(0, 1)[None].contiguous()) for i in range(len(obs.layers)))


def write_dump(folder: Path, obs: Observation, req: Request, mode: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(to_legacy_cache(obs), folder / CACHE_FILE)
    meta = {"mode": mode, "tokens": req.tokens, "private": req.private, "layout": asdict(obs.layout)}
    (folder / META_FILE).write_text(json.dumps(meta) + "\n")
    return folder


def read_dump(folder: Path) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
    return torch.load(folder / CACHE_FILE, weights_only=True)
