"""The enclave: a named Ray actor that alone holds the key.

One actor per server (named after vLLM's instance id), shared by all its workers.
It generates the key from the OS CSPRNG or reads a key file, and answers one
call per layer: transformed attention tensors plus the device material the
layer needs. In mode per-request it also answers, per new request, the seed of that
request's runtime matrices (an HMAC of the key and the request's key id, which predicts
that request's matrices and nothing else). No method returns the key; it exposes a
fingerprint and counters.

    handle = connect(ShieldConfig(mode="mix"), name=enclave_name(vllm_config))
    tensors, material = transform(handle, layer, shape, tensors, torch.bfloat16)
"""

import atexit
import contextlib
import fcntl
import glob
import json
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
        self._calls_per_layer: dict[int, int] = {}  # layer -> transforms served (one per worker holding it)
        self._bytes = 0
        self._seconds: list[float] = []
        self._request_seeds = 0

    def __repr__(self) -> str:
        return f"Enclave(mode={self._mode!r}, fingerprint={self._fingerprint!r})"

    def info(self) -> dict:
        """Public facts for logs and metrics: mode, key fingerprint, counters, this actor's Ray id and node."""
        return {
            "mode": self._mode,
            "fingerprint": self._fingerprint,
            "layers_transformed": sum(self._calls_per_layer.values()),
            "transforms_per_layer": dict(self._calls_per_layer),
            "actor_id": ray.get_runtime_context().get_actor_id(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "bytes_transformed": self._bytes,
            "transform_seconds": list(self._seconds),
            "request_seeds": self._request_seeds,
        }

    def transform(self, layer: int, shape: transforms.AttentionShape, tensors: dict, dtype: torch.dtype):
        t0 = time.perf_counter()
        out, material = transforms.shield_layer(self._key, layer, shape, self._mode, tensors, dtype)
        self._seconds.append(time.perf_counter() - t0)
        self._calls_per_layer[layer] = self._calls_per_layer.get(layer, 0) + 1
        self._bytes += sum(t.numel() * t.element_size() for t in tensors.values())
        return out, material

    def request_seeds(self, key_ids: list[str]) -> list[bytes]:
        """Mode per-request: one 32-byte seed per key id (a request's, or a tenant's)."""
        if self._mode != "per-request":
            raise ShieldError(f"kvshield: request seeds exist only in mode per-request; this enclave runs {self._mode!r}")
        bad = [k for k in key_ids if not (isinstance(k, str) and len(k) == transforms.KEY_ID_CHARS)]
        if bad:
            raise ShieldError(f"kvshield: malformed key id(s) {bad!r}; a key id is {transforms.KEY_ID_CHARS} hex digits")
        self._request_seeds += len(key_ids)
        return [transforms.request_seed(self._key, k) for k in key_ids]


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
    """Use the process's Ray if any, else join `address`, else this server's private local Ray.

    Workers that are Ray actors (vLLM's Ray executor) already run in the executor's Ray.
    An explicit address (the config's ray_address, else RAY_ADDRESS) is joined; "auto" joins
    the machine's running cluster or refuses. Without one (or with "local") the server gets a
    Ray of its own: the first worker starts it and records its address in
    `$TMPDIR/<deployment>.ray-address`, and the server's other workers join that one. Never
    Ray's implicit "auto": a Ray started by another process dies with that process and takes
    every driver that joined it along.
    """
    if ray.is_initialized():
        return
    kwargs = dict(namespace=NAMESPACE, include_dashboard=False, configure_logging=False, log_to_driver=False)
    address = address if address is not None else (os.environ.get("RAY_ADDRESS") or None)
    if address == "auto":
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            raise ShieldError("kvshield: ray_address 'auto' found no running Ray cluster") from None
        return
    if address is not None and address != "local":
        _check_reachable(address)
        ray.init(address=address, **kwargs)
        return
    record = address_file(deployment)
    with open(record + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = recorded_ray(deployment)
        if first is not None:
            first_address, auth_mode = first
            try:
                _check_reachable(first_address)
            except ShieldError:
                raise ShieldError(f"kvshield: the Ray at {first_address} this server's first worker started is gone") from None
            if auth_mode == "token":
                _enable_token_auth()
            ray.init(address=first_address, **kwargs)
            return
        _sweep_stale_records()
        ray.init(address="local", **kwargs)
        with open(record + ".tmp", "w") as f:  # renamed into place whole: the sweep never sees half a record
            json.dump({"address": ray.get_runtime_context().gcs_address, "auth_mode": os.environ.get("RAY_AUTH_MODE")}, f)
        os.replace(record + ".tmp", record)
        atexit.register(_remove, record, record + ".lock")


def join(address: str, auth_mode: str | None, deployment: str) -> None:
    """Join a server's Ray whose address is known (from recorded_ray, or explicit); never start one."""
    if auth_mode == "token":
        _enable_token_auth()
    init_ray(address, deployment)


def _enable_token_auth() -> None:
    """A new local Ray turns token auth on (its token in ~/.ray/auth_token); join it the way Ray
    joins a local cluster it found itself. Ray reads RAY_AUTH_MODE once at import, so setting the
    variable alone is not enough (Ray 2.60)."""
    from ray._private.authentication.authentication_token_setup import maybe_enable_token_auth_if_token_available

    if not maybe_enable_token_auth_if_token_available(warn_if_disabled=False):
        raise ShieldError("kvshield: this server's Ray uses token authentication, but no Ray token is readable here")


def address_file(deployment: str) -> str:
    """Where a server's first worker records the address of the Ray it started."""
    return os.path.join(tempfile.gettempdir(), f"{deployment}.ray-address")


def recorded_ray(deployment: str) -> tuple[str, str | None] | None:
    """(address, auth mode) of the private Ray a server's first worker started, or None if it recorded none."""
    record = address_file(deployment)
    try:
        with open(record) as f:
            first = json.load(f)
        return first["address"], first["auth_mode"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError) as e:
        raise ShieldError(f"kvshield: cannot read the enclave's Ray address from {record}: {e}") from None


def _sweep_stale_records() -> None:
    """Remove the records of servers whose private Ray is gone (vLLM ends its workers without atexit)."""
    for record in glob.glob(address_file("kvshield-enclave-*")):
        try:
            with open(record) as f:
                _check_reachable(json.load(f)["address"])
        except (OSError, ValueError, KeyError, ShieldError):
            _remove(record, record + ".lock")


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


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


def request_seeds(handle, key_ids: list[str]) -> list[bytes]:
    """The seeds of new requests' runtime matrices (mode per-request), one enclave round trip."""
    return call(handle, "request_seeds", key_ids)
