"""The enclave: a named Ray actor that alone holds the key.

One actor per server (named after vLLM's instance id), shared by all its workers.
It generates the key from the OS CSPRNG or reads a key file, and answers one
call per layer: transformed attention tensors plus the device material the
layer needs. No method returns the key; it exposes a fingerprint and counters.

    handle = connect(ShieldConfig(mode="mix"), name=enclave_name(vllm_config))
    tensors, material = transform(handle, layer, shape, tensors, torch.bfloat16)
"""

import fcntl
import os
import socket
import tempfile
import time

import ray
import torch

from . import transforms
from .config import ShieldConfig, ShieldError
from .keys import read_key_file

NAMESPACE = "kvshield"
CALL_TIMEOUT_S = 300.0
CONNECT_TIMEOUT_S = 5.0


class Enclave:
    """Holds the key; transforms one layer per call. Runs as a Ray actor."""

    def __init__(self, mode: str, key_file: str | None):
        self._key = read_key_file(key_file) if key_file else transforms.new_key()
        self._mode = mode
        self._fingerprint = transforms.fingerprint(self._key)
        self._layers = 0
        self._calls_per_layer: dict[int, int] = {}  # layer -> transforms served (one per worker holding it)
        self._bytes = 0
        self._seconds: list[float] = []

    def __repr__(self) -> str:
        return f"Enclave(mode={self._mode!r}, fingerprint={self._fingerprint!r})"

    def info(self) -> dict:
        """Public facts for logs and metrics: mode, key fingerprint, counters, this actor's Ray id and node."""
        return {
            "mode": self._mode,
            "fingerprint": self._fingerprint,
            "layers_transformed": self._layers,
            "transforms_per_layer": dict(self._calls_per_layer),
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "bytes_transformed": self._bytes,
            "transform_seconds": list(self._seconds),
        }

    def transform(self, layer: int, shape: transforms.AttentionShape, tensors: dict, dtype: torch.dtype):
        t0 = time.perf_counter()
        out, material = transforms.shield_layer(self._key, layer, shape, self._mode, tensors, dtype)
        self._seconds.append(time.perf_counter() - t0)
        self._layers += 1
        self._calls_per_layer[layer] = self._calls_per_layer.get(layer, 0) + 1
        self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return out, material


def enclave_name(vllm_config) -> str:
    """One name per server: every worker of that server finds the same actor."""
    return f"kvshield-enclave-{vllm_config.instance_id}"


def _check_reachable(address: str) -> None:
    """Fail fast: ray.init on an unreachable address retries for many minutes."""
    hostport = address.split("://", 1)[-1].rsplit("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ShieldError(f"kvshield: ray_address {address!r} is not host:port (or ray://host:port)")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ShieldError(f"kvshield: ray_address {address!r} is unreachable ({e}); refusing to start unshielded") from None


def init_ray(address: str | None, deployment: str) -> None:
    """Use the process's Ray if any, else join `address`, else the local Ray this deployment's first worker reached.

    Workers that are Ray actors (vLLM's Ray executor) already run in the executor's Ray.
    Otherwise the first worker of a server joins the running local Ray (or, with address
    None, starts one) and records that Ray's address; every later worker of the server
    must reach the same Ray, so that all of them find the one enclave (with several local
    Rays, Ray's "auto" may pick any: then the server refuses and asks for ray_address).
    """
    if ray.is_initialized():
        return
    kwargs = dict(namespace=NAMESPACE, include_dashboard=False, configure_logging=False, log_to_driver=False)
    if address is not None and address != "auto":
        _check_reachable(address)
        ray.init(address=address, **kwargs)
        return
    first_path = os.path.join(tempfile.gettempdir(), f"{deployment}.ray-address")
    lock_path = os.path.join(tempfile.gettempdir(), "kvshield-ray-init.lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = None
        if os.path.exists(first_path):
            with open(first_path) as f:
                first = f.read()
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            if address == "auto":
                raise ShieldError("kvshield: ray_address 'auto' found no running Ray cluster") from None
            if first is not None:
                raise ShieldError(f"kvshield: the Ray at {first} this server's first worker used is gone") from None
            ray.init(**kwargs)
        reached = ray.get_runtime_context().gcs_address
        if first is None:
            with open(first_path, "w") as f:
                f.write(reached)
        elif reached != first:
            ray.shutdown()
            raise ShieldError(
                f"kvshield: this server's workers reached different local Ray clusters ({first}, {reached}); "
                "set ray_address to the one the enclave should live in"
            )


def connect(cfg: ShieldConfig, name: str):
    """The server's enclave actor, created by the first worker that asks; its key fingerprint checked."""
    init_ray(cfg.ray_address, name)
    options = dict(name=name, namespace=NAMESPACE, get_if_exists=True, num_cpus=0, max_restarts=0)
    if cfg.enclave_resources:
        options["resources"] = dict(cfg.enclave_resources)
    handle = ray.remote(Enclave).options(**options).remote(cfg.mode, cfg.key_file)
    info = call(handle, "info")
    if info["mode"] != cfg.mode:
        raise ShieldError(f"kvshield: enclave {name!r} runs mode {info['mode']!r}, this worker asked for {cfg.mode!r}")
    return handle


def call(handle, method: str, *args, timeout: float = CALL_TIMEOUT_S):
    """One enclave call; a dead, failing or silent enclave becomes a ShieldError."""
    try:
        return ray.get(getattr(handle, method).remote(*args), timeout=timeout)
    except ray.exceptions.RayActorError as e:
        raise ShieldError(f"kvshield: the enclave actor is gone ({_cause(e)}); refusing to start unshielded") from None
    except ray.exceptions.GetTimeoutError:
        raise ShieldError(f"kvshield: the enclave did not answer {method} within {timeout:.0f} s") from None
    except ray.exceptions.RayTaskError as e:
        raise ShieldError(f"kvshield: the enclave refused {method}: {_cause(e)}") from None


def _cause(e: Exception) -> str:
    """The first line of the underlying error, without Ray's traceback around it."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    text = str(e)
    for marker in ("ShieldConfigError: ", "ShieldError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def transform(handle, layer: int, shape: transforms.AttentionShape, tensors: dict, dtype: torch.dtype):
    """Send one layer's attention tensors through the enclave."""
    return call(handle, "transform", layer, shape, tensors, dtype)
