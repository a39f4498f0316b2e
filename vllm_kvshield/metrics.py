"""kvshield_* series on vLLM's own /metrics, answered by the enclave actor at scrape time.

    kvshield serve --port 8000 &
    curl -s 127.0.0.1:8000/metrics | grep '^kvshield_'
    # kvshield_enabled 1.0
    # kvshield_info{key_fingerprint="3f9a...",mode="mix",model="SmolLM2-135M-Instruct"} 1.0

vLLM loads `KVShieldStatLogger` (entry point group `vllm.stat_logger_plugins`) in its API server
process, once the engine has loaded the model. The shielded workers live in other processes, so the
logger joins the server's Ray (never starts one), finds the enclave actor by name, and registers a
collector on prometheus_client's default registry, which vLLM's /metrics serves. Every scrape asks
the actor for its public facts (mode, key fingerprint, counters) with a short timeout; when it no
longer answers, the last facts stay exported, kvshield_enclave_up drops to 0 and a warning is logged
once. Names avoid "vllm": vLLM's Prometheus logger unregisters collectors whose names start "vllm:".
No series carries key material: the key fingerprint is a hash.
"""

import logging
import os
import signal
import threading
from dataclasses import dataclass

import prometheus_client
import ray
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from vllm.v1.metrics.loggers import AggregateStatLoggerBase

from . import ray_session
from .config import ShieldConfig, ShieldConfigError, ShieldError
from .enclave import enclave_name
from .shield_status import ShieldStatus

logger = logging.getLogger("vllm.plugins.kvshield")  # under "vllm": vLLM's handlers and format

SCRAPE_TIMEOUT_S = 2.0  # a scrape runs on the API server's event loop: never wait long for the actor
# per-layer transform seconds: ~1 ms (135M model, CPU) up to seconds (large layers)
TRANSFORM_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class EnclaveFacts:
    """What the enclave's info() says, reduced to what is exported (no key material)."""

    status: ShieldStatus  # mode, key fingerprint, distinct layers transformed (a layer served to several workers counts once)
    bytes_transformed: int  # checkpoint bytes sent through the enclave
    transform_seconds: tuple[float, ...]  # one entry per transform call
    request_seeds: int  # mode per-request: request seeds derived (one per request whose matrices went to a worker)
    requests_ready_ahead: int  # of those, requests whose matrices the enclave had expanded before they came

    @classmethod
    def from_info(cls, info: dict) -> "EnclaveFacts":
        return cls(
            status=ShieldStatus.from_enclave_info(info),
            bytes_transformed=int(info["bytes_transformed"]),
            transform_seconds=tuple(info["transform_seconds"]),
            request_seeds=int(info["request_seeds"]),
            requests_ready_ahead=int((info.get("ahead") or {}).get("hits", 0)),
        )


def histogram_buckets(values: tuple[float, ...], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """Cumulative Prometheus buckets [(le, count), ..., ("+Inf", n)] of values."""
    buckets = [(repr(float(b)), sum(1 for v in values if v <= b)) for b in bounds]
    return buckets + [("+Inf", len(values))]


def join_ray(address: str, auth_mode: str | None, name: str) -> None:
    """Join the enclave's Ray through ray_session.join (reachability checked first, never a new Ray).

    ray.init replaces the process's SIGTERM handler; vLLM's is put back.
    """
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if main_thread else None
    try:
        ray_session.join(address, auth_mode, name)
    finally:
        if main_thread and previous is not None:
            signal.signal(signal.SIGTERM, previous)


class ShieldCollector(Collector):
    """Collects the kvshield_* series; each collect() asks the enclave actor once."""

    def __init__(self, shield: ShieldConfig | None, name: str, model: str, executor_backend=None):
        self.shield = shield
        self.name = name
        self.model = model
        self.executor_backend = executor_backend
        self._handle = None
        self._joined = False
        self._facts: EnclaveFacts | None = None  # the last facts the actor gave
        self._up = False
        self._warned = False
        self._lock = threading.Lock()

    @property
    def facts(self) -> EnclaveFacts | None:
        return self._facts

    def join(self) -> None:
        """Find the enclave actor once; a failure is logged and leaves the enclave down."""
        with self._lock:
            if self._joined or self.shield is None:
                return
            self._joined = True
            try:
                address, auth_mode = ray_session.server_ray(self.shield.ray_address, self.name, self.executor_backend)
                join_ray(address, auth_mode, self.name)
                self._handle = ray.get_actor(self.name, namespace=ray_session.NAMESPACE)
            except (ShieldError, ShieldConfigError, ValueError, ConnectionError) as e:
                self._warn(f"cannot reach the enclave actor {self.name!r} ({e})")

    def refresh(self) -> bool:
        """Ask the actor for its facts (bounded by SCRAPE_TIMEOUT_S); whether it answered."""
        self.join()
        with self._lock:
            if self._handle is None:
                self._up = False
                return False
            try:
                info = ray.get(self._handle.info.remote(), timeout=SCRAPE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                self._warn(f"the enclave actor {self.name!r} did not answer within {SCRAPE_TIMEOUT_S} s")
                self._up = False
                return False
            except ray.exceptions.RayError as e:
                self._warn(f"the enclave actor {self.name!r} is gone ({ray_session.error_cause(e)})")
                self._up = False
                return False
            self._facts = EnclaveFacts.from_info(info)
            if not self._up and self._warned:
                logger.info("kvshield: the enclave actor %r answers again", self.name)
                self._warned = False
            self._up = True
            return True

    def _warn(self, problem: str) -> None:
        if not self._warned:
            logger.warning(
                "kvshield: %s; serving continues with the weights it already transformed "
                "(kvshield_enclave_up is 0; a restart needs a live enclave)",
                problem,
            )
            self._warned = True

    def collect(self):
        if self.shield is not None:
            self.refresh()
        facts = self._facts
        enabled = GaugeMetricFamily(
            "kvshield_enabled", "1 when the enclave transformed this server's attention weights (the shield is on)"
        )
        enabled.add_metric([], 1.0 if facts is not None and facts.status.enabled else 0.0)
        yield enabled
        if self.shield is None:
            return
        up = GaugeMetricFamily("kvshield_enclave_up", "1 when the enclave actor answered this scrape")
        up.add_metric([], 1.0 if self._up else 0.0)
        yield up
        if facts is None:
            return
        info = GaugeMetricFamily(
            "kvshield_info", "The shield's mode and key fingerprint (a hash, never key material)",
            labels=["mode", "key_fingerprint", "model"],
        )
        info.add_metric([facts.status.mode, facts.status.fingerprint, self.model], 1.0)
        yield info
        layers = GaugeMetricFamily("kvshield_layers_shielded", "Decoder layers whose attention the enclave transformed")
        layers.add_metric([], float(facts.status.layers))
        yield layers
        transformed = CounterMetricFamily(
            "kvshield_weights_transformed_bytes", "Checkpoint attention bytes sent through the enclave"
        )
        transformed.add_metric([], float(facts.bytes_transformed))
        yield transformed
        seconds = HistogramMetricFamily(
            "kvshield_load_transform_seconds", "Seconds the enclave spent transforming one layer at load"
        )
        seconds.add_metric(
            [], buckets=histogram_buckets(facts.transform_seconds, TRANSFORM_SECONDS_BUCKETS),
            sum_value=sum(facts.transform_seconds),
        )
        yield seconds
        if facts.status.mode == "per-request":
            seeds = CounterMetricFamily(
                "kvshield_request_keys",
                "Request seeds the enclave derived (mode per-request): one per request whose matrices it handed to a worker, on its arrival or fetched ahead of it",
            )
            seeds.add_metric([], float(facts.request_seeds))
            yield seeds
            ready = CounterMetricFamily(
                "kvshield_request_keys_ready",
                "Of those, requests whose matrices the enclave had expanded before they came (mode per-request)",
            )
            ready.add_metric([], float(facts.requests_ready_ahead))
            yield ready


_installed: ShieldCollector | None = None  # the collector on the default registry, one per process
_install_lock = threading.Lock()


def install(collector: ShieldCollector) -> None:
    """Register `collector` on the registry /metrics serves, replacing an earlier one of this process."""
    global _installed
    with _install_lock:
        if _installed is not None:
            prometheus_client.REGISTRY.unregister(_installed)
        prometheus_client.REGISTRY.register(collector)
        _installed = collector


class KVShieldStatLogger(AggregateStatLoggerBase):
    """vllm.stat_logger_plugins entry point: installs the kvshield collector in the API server process."""

    def __init__(self, vllm_config, engine_indexes: list[int] | None = None):
        shield = ShieldConfig.from_vllm_config(vllm_config)
        self.collector = ShieldCollector(
            shield,
            enclave_name(vllm_config),
            str(vllm_config.model_config.served_model_name),
            vllm_config.parallel_config.distributed_executor_backend,
        )
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR") and shield is not None:
            logger.warning(
                "kvshield: several API server processes (PROMETHEUS_MULTIPROC_DIR) serve /metrics from their "
                "multiprocess files: the kvshield_* series are not exported there; check the 'shield active' log line"
            )
        install(self.collector)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
        pass

    def log(self):
        """vLLM calls this every VLLM_LOG_STATS_INTERVAL: a dead enclave is noticed without scrapes."""
        if self.collector.shield is not None:
            self.collector.refresh()

    def log_engine_initialized(self):
        if self.collector.shield is not None and self.collector.refresh():
            facts = self.collector.facts
            logger.info(
                "kvshield: metrics on /metrics: mode=%s, key fingerprint %s, %d layers shielded",
                facts.status.mode, facts.status.fingerprint, facts.status.layers,
            )
