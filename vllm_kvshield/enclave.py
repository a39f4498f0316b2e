"""The enclave: a named Ray actor that alone holds the key.

One actor per server (named after vLLM's instance id), shared by all its workers.
It generates the key from the OS CSPRNG or reads a key file, and answers one
call per layer: transformed attention tensors plus the device material the
layer needs. In mode per-request it also answers, per new request, that request's runtime
matrices, expanded from an HMAC of the key and the request's key id (which predicts that
request's matrices and nothing else); the next fresh key ids' matrices are expanded ahead, on
the enclave's CPU (material_ahead.py). No method returns the key or a seed; it exposes a
fingerprint and counters. The Ray it lives in is ray_session's business.

    handle = connect(ShieldConfig(mode="mix"), name=enclave_name(vllm_config))
    tensors, material = transform(handle, layer, shape, tensors, torch.bfloat16)
"""

import time
import warnings

import numpy as np
import ray
import torch

from . import transforms
from .config import ShieldConfig, ShieldError
from .keys import read_key_file
from .material_ahead import MaterialAhead
from .material_fetch import MaterialFetch
from .ray_session import DEPLOYMENT_PREFIX, NAMESPACE, error_cause, init_ray

CALL_TIMEOUT_S = 300.0


class Enclave:
    """Holds the key; transforms one layer per call. Runs as a Ray actor."""

    def __init__(self, mode: str, key_file: str | None, prepare_ahead: int = 0, torch_threads: int | None = None):
        self._key = read_key_file(key_file) if key_file else transforms.new_key()
        self._mode = mode
        self._fingerprint = transforms.fingerprint(self._key)
        self._calls_per_layer: dict[int, int] = {}  # layer -> transforms served (one per worker holding it)
        self._bytes = 0
        self._seconds: list[float] = []
        self._request_seeds = 0
        self._ahead = MaterialAhead(self._expand, prepare_ahead) if mode == "per-request" else None
        if torch_threads is not None:
            torch.set_num_threads(torch_threads)  # this process's

    def __repr__(self) -> str:
        return f"Enclave(mode={self._mode!r}, fingerprint={self._fingerprint!r})"

    def info(self) -> dict:
        """Public facts for logs and metrics: mode, key fingerprint, counters, this actor's Ray id and node.

        layers_transformed counts distinct layers; transform_calls counts calls (layers x tensor-parallel ranks).
        """
        return {
            "mode": self._mode,
            "fingerprint": self._fingerprint,
            "layers_transformed": len(self._calls_per_layer),
            "transform_calls": sum(self._calls_per_layer.values()),
            "transforms_per_layer": dict(self._calls_per_layer),
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "bytes_transformed": self._bytes,
            "transform_seconds": list(self._seconds),
            "request_seeds": self._request_seeds,
            "ahead": self._ahead.counts() if self._ahead else None,  # mode per-request: material_ahead's counters
        }

    def transform(self, layer: int, shape: transforms.AttentionShape, tensors: dict, dtype: torch.dtype):
        t0 = time.perf_counter()
        out, material = transforms.shield_layer(self._key, layer, shape, self._mode, tensors, dtype)
        self._seconds.append(time.perf_counter() - t0)
        self._calls_per_layer[layer] = self._calls_per_layer.get(layer, 0) + 1
        self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return out, material

    def request_material(self, key_ids: list[str], layers: list[int], kv_heads: list[int], head_dim: int, dtype: torch.dtype,
                         ready_only: bool = False):
        """Mode per-request: each key id's (a request's, or a tenant's) runtime matrices [L, 4, H, d, d] for one
        worker's layers and KV heads, in its dtype (transforms.request_material), as a list of material_bits.
        ready_only (a worker's call ahead): only matrices already expanded, None for the others; nothing is
        expanded on such a call."""
        if self._mode != "per-request":
            raise ShieldError(f"kvshield: request matrices exist only in mode per-request; this enclave runs {self._mode!r}")
        bad = [k for k in key_ids if not transforms.is_key_id(k)]
        if bad or not key_ids:
            raise ShieldError(f"kvshield: malformed key id(s) {bad!r}; a key id is {transforms.KEY_ID_CHARS} characters: "
                              f"{transforms.TENANT!r} or {transforms.FRESH!r}, then hex digits")
        part = (tuple(int(i) for i in layers), tuple(int(h) for h in kv_heads), int(head_dim), dtype)
        mats = self._ahead.take_ready(list(key_ids), part) if ready_only else self._ahead.take(list(key_ids), part)
        self._request_seeds += sum(m is not None for m in mats)
        return [None if m is None else material_bits(m) for m in mats]

    def _expand(self, key_ids: list[str], part) -> torch.Tensor:
        layers, kv_heads, head_dim, dtype = part
        seeds = [transforms.request_seed(self._key, k) for k in key_ids]
        return transforms.request_material(seeds, layers, kv_heads, head_dim).to(dtype)


def enclave_name(vllm_config) -> str:
    """One name per server: every worker of that server finds the same actor."""
    return f"{DEPLOYMENT_PREFIX}{vllm_config.instance_id}"


def connect(cfg: ShieldConfig, name: str):
    """The server's enclave actor, created by the first worker that asks; refused when it runs another mode.

    The key fingerprint is not checked here (a worker knows no fingerprint); `kvshield serve` checks the
    workers' reported fingerprints against the key file's.
    """
    init_ray(cfg.ray_address, name)
    options = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=0)
    if cfg.enclave_resources:
        options["resources"] = dict(cfg.enclave_resources)
    # mode per-request: its thread expands matrices while the server runs; one core, not every core vLLM's worker uses
    threads = 1 if cfg.mode == "per-request" else None
    handle = ray.remote(Enclave).options(**options).remote(cfg.mode, cfg.key_file, cfg.prepare_ahead, threads)
    info = call(handle, "info")
    if info["mode"] != cfg.mode:
        raise ShieldError(f"kvshield: enclave {name!r} runs mode {info['mode']!r}, this worker asked for {cfg.mode!r}")
    return handle


def call(handle, method: str, *args, timeout: float = CALL_TIMEOUT_S, refusing: str = "refusing to start unshielded"):
    """One enclave call; a dead, failing or silent enclave becomes a ShieldError (`refusing`: what then stops)."""
    return answer(getattr(handle, method).remote(*args), method, timeout=timeout, refusing=refusing)


def answer(ref, method: str, *, refusing: str, timeout: float = CALL_TIMEOUT_S):
    """The result of an enclave call already made (ref), as call() returns it."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.RayActorError as e:
        raise ShieldError(f"kvshield: the enclave actor is gone ({error_cause(e)}); {refusing}") from None
    except ray.exceptions.GetTimeoutError:
        raise ShieldError(f"kvshield: the enclave did not answer {method} within {timeout:.0f} s") from None
    except ray.exceptions.RayTaskError as e:
        raise ShieldError(f"kvshield: the enclave refused {method}: {error_cause(e)}") from None


def transform(handle, layer: int, shape: transforms.AttentionShape, tensors: dict, dtype: torch.dtype):
    """Send one layer's attention tensors through the enclave."""
    return call(handle, "transform", layer, shape, tensors, dtype)


_NO_KEYS = "mode per-request cannot key new requests; refusing to serve them"


def material_fetch(handle, layers: list[int], kv_heads: list[int], head_dim: int, dtype: torch.dtype, depth: int) -> MaterialFetch:
    """A worker's request_material with the next fresh key ids' matrices asked for ahead (material_fetch.py)."""
    return MaterialFetch(
        ask=lambda key_ids, ready_only: handle.request_material.remote(key_ids, layers, kv_heads, head_dim, dtype, ready_only),
        ready=lambda ref: bool(ray.wait([ref], timeout=0)[0]),
        answer=lambda ref: [None if b is None else material_tensor(b, dtype) for b in answer(ref, "request_material", refusing=_NO_KEYS)],
        depth=depth,
    )


_BITS = {torch.bfloat16: torch.int16, torch.float16: torch.int16}  # numpy has no bf16: such tensors travel as their bits


def material_bits(t: torch.Tensor) -> np.ndarray:
    """The enclave's answer as a numpy array (the dtype's bits): Ray hands a numpy array to the worker without a
    copy, where it pickles a torch tensor (32 SmolLM2 requests, 90 MiB: 18 ms against 200 ms, measured here)."""
    return t.view(_BITS.get(t.dtype, t.dtype)).numpy()


def material_tensor(bits: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """material_bits' array as a tensor of dtype, without a copy."""
    with warnings.catch_warnings():  # Ray's zero-copy arrays are read-only; the worker only copies from them
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(bits).view(dtype)
