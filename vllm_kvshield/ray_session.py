"""The Ray a server's enclave lives in: join it, or start the server's private one, never another's by accident.

    init_ray(cfg.ray_address, deployment)          # a worker: the process's Ray, the address, or the server's own
    join(*recorded_ray(deployment), deployment)    # another process of that server: join, never start
    check_reachable("10.0.0.5:6379")               # fail fast instead of ray.init's minutes of retries

Without an explicit address the server's first worker starts a local Ray and records its address in
`$TMPDIR/<deployment>.ray-address`; the server's other workers (and its API server, for metrics) join it.
"""

import atexit
import contextlib
import fcntl
import glob
import json
import os
import socket
import tempfile

import ray

from .config import ShieldError

NAMESPACE = "kvshield"
CONNECT_TIMEOUT_S = 5.0
DEPLOYMENT_PREFIX = "kvshield-enclave-"  # every deployment (enclave.enclave_name) is named so; the sweep reads only those


def check_reachable(address: str) -> None:
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
    every driver that joined it along. Ray's processes and threads started here run off the
    worker's compute cores (`off_compute_cores`).
    """
    if ray.is_initialized():
        return
    with off_compute_cores():
        _init_ray(address, deployment)


def _init_ray(address: str | None, deployment: str) -> None:
    kwargs = dict(namespace=NAMESPACE, include_dashboard=False, configure_logging=False, log_to_driver=False)
    address = address if address is not None else (os.environ.get("RAY_ADDRESS") or None)
    if address == "auto":
        try:
            ray.init(address="auto", **kwargs)
        except ConnectionError:
            raise ShieldError("kvshield: ray_address 'auto' found no running Ray cluster") from None
        return
    if address is not None and address != "local":
        check_reachable(address)
        ray.init(address=address, **kwargs)
        return
    record = address_file(deployment)
    with open(record + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        first = recorded_ray(deployment)
        if first is not None:
            first_address, auth_mode = first
            try:
                check_reachable(first_address)
            except ShieldError:
                raise ShieldError(f"kvshield: the Ray at {first_address} this server's first worker started is gone") from None
            if auth_mode == "token":
                _enable_token_auth()
            ray.init(address=first_address, **kwargs)
            return
        sweep_stale_records()
        ray.init(address="local", **kwargs)
        with open(record + ".tmp", "w") as f:  # renamed into place whole: the sweep never sees half a record
            json.dump({"address": ray.get_runtime_context().gcs_address, "auth_mode": os.environ.get("RAY_AUTH_MODE")}, f)
        os.replace(record + ".tmp", record)
        atexit.register(_remove, record, record + ".lock")


# vLLM's CPU worker sets these for its OpenMP (with libgomp in LD_PRELOAD); every process started with them
# pins its main thread to the worker's cores when libgomp loads, whatever its parent's affinity.
PINNING_ENV = ("GOMP_CPU_AFFINITY", "KMP_AFFINITY")


@contextlib.contextmanager
def off_compute_cores():
    """Start processes and threads in the block off the cores this thread computes on, when there are others.

    vLLM's CPU worker pins its thread to its OpenMP cores (on a 2-core machine: core 0, core 1 left to
    the other processes). A Ray started from the worker as is (GCS, raylet, the enclave actor making
    request matrices) would inherit that pin, through the thread's affinity and the environment, and
    take turns with the model on its core.
    """
    pinned = os.sched_getaffinity(0)  # this thread's
    try:
        allowed = os.sched_getaffinity(os.getppid())  # the process that started the worker: not pinned by it
    except OSError:
        allowed = pinned
    spare = allowed - pinned
    if not spare:
        yield
        return
    saved = {name: os.environ.pop(name) for name in PINNING_ENV if name in os.environ}
    os.sched_setaffinity(0, spare)
    try:
        yield
    finally:
        os.sched_setaffinity(0, pinned)
        os.environ.update(saved)


def join(address: str, auth_mode: str | None, deployment: str) -> None:
    """Join a server's Ray whose address is known (from recorded_ray, or explicit); never start one."""
    if auth_mode == "token":
        _enable_token_auth()
    init_ray(address, deployment)


def server_ray(ray_address: str | None, deployment: str, executor_backend) -> tuple[str, str | None]:
    """The Ray a server's enclave lives in, as (address, auth_mode), for a process that joins it later.

    An explicit address (the config's ray_address, else RAY_ADDRESS) is the one the workers joined; else
    the record the server's first worker wrote for its private Ray; else vLLM's Ray executor's ("auto").
    """
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address is not None and address != "local":
        return address, None
    recorded = recorded_ray(deployment)
    if recorded is not None:
        return recorded
    if executor_backend == "ray":
        return "auto", None
    raise ShieldError(f"kvshield: no record of the enclave's Ray at {address_file(deployment)}")


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


def sweep_stale_records() -> None:
    """Remove the records of servers whose private Ray is gone (vLLM ends its workers without atexit)."""
    for record in glob.glob(address_file(DEPLOYMENT_PREFIX + "*")):
        try:
            with open(record) as f:
                check_reachable(json.load(f)["address"])
        except (OSError, ValueError, KeyError, ShieldError):
            _remove(record, record + ".lock")


def _remove(*paths: str) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def error_cause(e: Exception) -> str:
    """The first line of the error under a Ray error, without Ray's traceback around it."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, Exception) and not isinstance(cause, ray.exceptions.RayError):
        return f"{type(cause).__name__}: {cause}"
    text = str(e)
    for marker in ("ShieldConfigError: ", "ShieldError: "):
        if marker in text:
            return text.split(marker, 1)[1].splitlines()[0]
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__
