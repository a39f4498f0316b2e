"""Offline engines: one vllm.LLM per mode, all alive in one process, their enclaves on the bench's own Ray.

Mode "none" is plain vLLM (the plugin installed, no flag); every other mode passes the flag.
A shielded engine counts only once its enclave actor reports that mode and every layer
transformed: a benchmark of an engine that silently ran unshielded would be meaningless.

    with RayCluster(), OfflineEngines(model, settings, log) as engines:
        engines.llms["mix"].generate(...)
"""

import os
import time

import psutil
import ray

from .. import enclave
from ..config import CONFIG_KEY, ShieldError
from .settings import PLAIN, Settings

RAY_NAMESPACE = "kvshield-bench"


class RayCluster:
    """A fresh local Ray for the bench process; RAY_ADDRESS points the engines' enclaves at it.

    vllm_kvshield.enclave otherwise joins whatever Ray runs on the machine, which may stop mid-run.
    """

    def __enter__(self) -> "RayCluster":
        assert not ray.is_initialized(), "Ray already initialised in the bench process"
        before = {p.pid for p in psutil.Process().children()}
        ray.init(
            address="local",
            namespace=RAY_NAMESPACE,
            include_dashboard=False,
            configure_logging=False,
            log_to_driver=False,
        )
        self._saved = os.environ.get("RAY_ADDRESS")
        os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        self.processes = [p for p in psutil.Process().children() if p.pid not in before]  # GCS, raylet, agents
        return self

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            os.environ.pop("RAY_ADDRESS", None)
        else:
            os.environ["RAY_ADDRESS"] = self._saved
        ray.shutdown()


def engine_options(settings: Settings, mode: str) -> dict:
    """vllm.LLM keyword arguments of one mode's engine (they differ only by the flag)."""
    return dict(
        dtype=settings.dtype,
        kv_cache_memory_bytes=settings.kv_cache_memory_bytes,
        max_model_len=settings.max_model_len,
        enforce_eager=settings.enforce_eager,
        seed=settings.seed,
        additional_config={} if mode == PLAIN else {CONFIG_KEY: {"mode": mode}},
    )


def kv_capacity_tokens(llm) -> int:
    """The KV cache capacity the engine reported: blocks x block size."""
    cache = llm.llm_engine.vllm_config.cache_config
    assert cache.num_gpu_blocks, f"engine reported no KV blocks ({cache.num_gpu_blocks!r})"
    return int(cache.num_gpu_blocks) * int(cache.block_size)


def enclave_info(llm) -> dict:
    """The engine's enclave actor's info(): mode, fingerprint, layers, per-layer transform seconds."""
    name = enclave.enclave_name(llm.llm_engine.vllm_config)
    try:
        handle = ray.get_actor(name, namespace=enclave.NAMESPACE)
    except ValueError:
        raise ShieldError(f"kvshield: no enclave actor {name!r} on the bench's Ray: the engine is not shielded") from None
    return enclave.call(handle, "info")


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
        self.processes: dict[str, list[psutil.Process]] = {}  # per mode: the engine's processes (EngineCore)

    def __enter__(self) -> "OfflineEngines":
        from vllm import LLM

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
                if mode != PLAIN:
                    self.enclaves[mode] = self._check_shielded(mode, llm)
        except BaseException:
            self.close()
            raise
        return self

    def _check_shielded(self, mode: str, llm) -> dict:
        info = enclave_info(llm)
        layers = llm.llm_engine.vllm_config.model_config.hf_config.num_hidden_layers
        if info["mode"] != mode or info["layers_transformed"] != layers:
            raise ShieldError(
                f"kvshield: the {mode!r} engine's enclave reports mode {info['mode']!r}, "
                f"{info['layers_transformed']} of {layers} layers transformed"
            )
        return info

    def close(self) -> None:
        for llm in self.llms.values():
            llm.llm_engine.engine_core.shutdown()
        self.llms.clear()

    def __exit__(self, *exc) -> None:
        self.close()
