"""Offline engines: one vllm.LLM per mode, all alive in one process, each shielded one with its own Ray.

Mode "none" is plain vLLM (the plugin installed, no flag); every other mode passes the flag.
Each shielded engine's worker starts a private Ray for its enclave, as a server's does (a Ray
shared by several engines' workers made their idle Ray threads spin in Ray 2.60 and slowed the
other modes' runs). A shielded engine counts only once its enclave actor reports that mode and
every layer transformed: a benchmark of an engine that silently ran unshielded would be meaningless.
Every engine may run a function in its worker (LLM.apply_model, VLLM_ALLOW_INSECURE_SERIALIZATION=1,
set alike for all): the bench reads the per-request matrices a per-request worker holds.

    with OfflineEngines(model, settings, log) as engines:
        engines.llms["mix"].generate(...)
        engines.held_material("per-request")   # {"row_bytes": ..., "rows": ..., "bytes": ...}
    with RayCluster():  # the ablation's actor
        ...
"""

import os
import time

import psutil
import ray

from .. import ray_session
from ..config import PLAIN_MODE, ShieldError, additional_config
from ..enclave import call, enclave_name
from ..shield_status import ShieldStatus
from .material import held_material
from .settings import PER_REQUEST, Settings

RAY_NAMESPACE = "kvshield-bench"
ENVIRONMENT = {
    "RAY_ADDRESS": "local",  # each shielded engine's worker starts its own Ray
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # LLM.apply_model (the bench's own functions, in its own engines)
}


class RayCluster:
    """A fresh local Ray for the bench process itself (the ablation's actor)."""

    def __enter__(self) -> "RayCluster":
        assert not ray.is_initialized(), "Ray already initialised in the bench process"
        ray.init(
            address="local",
            namespace=RAY_NAMESPACE,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        return self

    def __exit__(self, *exc) -> None:
        ray.shutdown()


def engine_options(settings: Settings, mode: str) -> dict:
    """vllm.LLM keyword arguments of one mode's engine (they differ only by the flag)."""
    return dict(
        dtype=settings.dtype,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        max_model_len=settings.max_model_len,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        additional_config=additional_config(mode),
    )


def kv_capacity_tokens(llm) -> int:
    """The KV cache capacity the engine reported: blocks x block size."""
    cache = llm.llm_engine.vllm_config.cache_config
    assert cache.num_gpu_blocks, f"engine reported no KV blocks ({cache.num_gpu_blocks!r})"
    return int(cache.num_gpu_blocks) * int(cache.block_size)


def enclave_info(llm) -> dict:
    """The engine's enclave actor's info() (mode, fingerprint, layers, per-layer transform seconds),
    asked through the private Ray its worker recorded; the bench process leaves that Ray afterwards."""
    name = enclave_name(llm.llm_engine.vllm_config)
    recorded = ray_session.recorded_ray(name)
    if recorded is None:
        raise ShieldError(f"kvshield: the engine recorded no Ray for enclave {name!r}: it is not shielded")
    ray_session.join(*recorded, name)
    try:
        handle = ray.get_actor(name, namespace=ray_session.NAMESPACE)
        return call(handle, "info")
    except ValueError:
        raise ShieldError(f"kvshield: no enclave actor {name!r} in the engine's Ray: the engine is not shielded") from None
    finally:
        ray.shutdown()


def tree_cpu_seconds(roots: list[psutil.Process]) -> float:
    """User + system CPU seconds of the roots and all their descendants now alive."""
    total = 0.0
    for root in roots:
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
    return total


def idle_cpu(groups: dict[str, list[psutil.Process]], seconds: float) -> dict[str, float]:
    """CPU used by each group of process trees while nothing is asked of them, in cores (1.0 = one core busy)."""
    before = {name: tree_cpu_seconds(roots) for name, roots in groups.items()}
    t0 = time.perf_counter()
    time.sleep(seconds)
    elapsed = time.perf_counter() - t0
    return {name: (tree_cpu_seconds(roots) - before[name]) / elapsed for name, roots in groups.items()}


class OfflineEngines:
    """Start every mode's engine (recording its start time, KV capacity and enclave info); shut all down on exit."""

    def __init__(self, model: str, settings: Settings, log):
        self.model = model
        self.settings = settings
        self.log = log
        self.llms: dict = {}
        self.start_seconds: dict[str, float] = {}
        self.kv_capacity: dict[str, int] = {}
        self.enclaves: dict[str, dict] = {}
        self.processes: dict[str, list[psutil.Process]] = {}  # per mode: the engine's processes (EngineCore, its Ray)

    def __enter__(self) -> "OfflineEngines":
        from vllm import LLM

        self._saved_environment = {name: os.environ.get(name) for name in ENVIRONMENT}
        os.environ.update(ENVIRONMENT)
        try:
            for mode in self.settings.modes:
                self.log(f"starting the {mode!r} engine")
                before = {p.pid for p in psutil.Process().children()}
                t0 = time.perf_counter()
                llm = LLM(self.model, **engine_options(self.settings, mode))
                self.start_seconds[mode] = time.perf_counter() - t0
                self.processes[mode] = [p for p in psutil.Process().children() if p.pid not in before]
                self.llms[mode] = llm
                self.kv_capacity[mode] = kv_capacity_tokens(llm)
                if mode != PLAIN_MODE:
                    self.enclaves[mode] = self._check_shielded(mode, llm)
        except BaseException:
            self.close()
            raise
        return self

    def _check_shielded(self, mode: str, llm) -> dict:
        """The engine's enclave info, once it says that mode with every layer transformed (distinct layers:
        under tensor parallelism each layer is transformed once per rank)."""
        info = enclave_info(llm)
        layers = llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers
        problem = ShieldStatus.from_enclave_info(info).mismatch(mode, layers=layers)
        if problem is not None:
            raise ShieldError(f"kvshield: the {mode!r} engine's enclave reports {problem}")
        return info

    def held_material(self, mode: str) -> dict:
        """Mode per-request: the request matrices its worker holds now (material.held_material)."""
        assert mode == PER_REQUEST, f"mode {mode!r} holds no per-request matrices"
        return self.llms[mode].apply_model(held_material)[0]

    def close(self) -> None:
        for llm in self.llms.values():
            llm.llm_engine.engine_core.shutdown()
        self.llms.clear()
        for name, value in self._saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value

    def __exit__(self, *exc) -> None:
        self.close()
