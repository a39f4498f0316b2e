"""Server processes for the benchmark: plain vLLM and `kvshield serve --mode MODE`, with identical vLLM arguments.

    plain:     python -m vllm.entrypoints.openai.api_server ARGS
    MODE:      python -m vllm_kvshield.cli serve --mode MODE --log-file LOG ARGS

A server's kind is "plain" or its shield mode. Each runs in its own session. A sampler thread
follows the process tree (psutil) every SAMPLE_S: the sum of its processes' RSS (peak kept), the
RSS of its EngineCore process (where vLLM's CPU worker holds the model, the KV cache and, in mode
per-request, the request matrices) and whether the tree started a Ray cluster.
For `kvshield serve`, its output gives when its checks ended and it handed vLLM the arguments
("kvshield: starting vLLM"; its server process was started earlier, to import vLLM meanwhile).
"""

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import psutil

from ..default_model import MODEL_NAME
from ..launch import SERVER_MODULE
from ..serve import STARTING_MESSAGE
from ..server_process import ProcessTree, stop_session, wait_healthy
from ..shield_status import ShieldStatus
from .settings import Settings

SAMPLE_S = 0.2
READY_TIMEOUT_S = 1800.0
STOP_GRACE_S = 60.0
KV_CAPACITY_LINE = re.compile(r"KV cache size: (?P<tokens>[\d,]+) tokens")
MATERIAL_LINE = re.compile(r"kvshield: per-request matrices: (?P<mib>[\d.]+) MiB per request in the batch \(up to (?P<rows>\d+)\)")
STARTING_LINE = re.compile("^" + re.escape(STARTING_MESSAGE))
ENGINE_CORE = "EngineCore"  # in the process title vLLM gives its engine core process ("VLLM::EngineCore")
HOST = "127.0.0.1"
PLAIN = "plain"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def vllm_args(model: str, settings: Settings, port: int | str) -> list[str]:
    """The vLLM server arguments every kind gets."""
    args = [
        "--model", model,
        "--served-model-name", MODEL_NAME,
        "--host", HOST,
        "--port", str(port),
        "--dtype", settings.dtype,
        "--max-model-len", str(settings.max_model_len),
        "--kv-cache-memory-bytes", str(settings.server_kv_cache_memory_bytes),
        "--seed", str(settings.seed),
    ]
    return args + (["--enforce-eager"] if settings.enforce_eager else [])


def command(kind: str, args: list[str], log_path: str) -> list[str]:
    """kind: "plain" or the shield mode of a `kvshield serve`."""
    if kind == PLAIN:
        return [sys.executable, "-m", SERVER_MODULE, *args]
    return [sys.executable, "-m", "vllm_kvshield.cli", "serve", "--mode", kind, "--log-file", log_path, *args]


def is_engine_core(p: psutil.Process) -> bool:
    return ENGINE_CORE in p.name() or any(ENGINE_CORE in part for part in p.cmdline()[:1])


class ServerFailed(RuntimeError):
    """A benchmark server did not start (or started without the expected shield state)."""


@dataclass
class Sample:
    peak_rss: int = 0  # the whole tree
    engine_rss: int = 0  # the EngineCore process, last sample
    peak_engine_rss: int = 0


class ServerProcess:
    """One server started now; ready(), then stop(). Times are seconds since the Popen call."""

    def __init__(self, kind: str, model: str, settings: Settings, log_dir: str, tag: str):
        self.kind = kind
        self.port = free_port()
        self.log_path = os.path.join(log_dir, f"{tag}-{kind}.log")
        self.base_url = f"http://{HOST}:{self.port}"
        self.mode = None if kind == PLAIN else kind
        self.command = command(kind, vllm_args(model, settings, self.port), self.log_path)
        self.ready: ShieldStatus | None = None  # what `kvshield serve`'s ready line says
        self.ready_line_s: float | None = None
        self.starting_line_s: float | None = None  # `kvshield serve` handed vLLM its arguments
        self.sample = Sample()
        self._stopping = threading.Event()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["RAY_ADDRESS"] = "local"  # a shielded server starts its own Ray, as on a machine of its own
        shielded = self.mode is not None
        self._out = open(self.log_path + ".launcher" if shielded else self.log_path, "w", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            self.command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if shielded else self._out,
            stderr=subprocess.STDOUT if shielded else self._out,
            env=env,
            start_new_session=True,
        )
        self.tree = ProcessTree(psutil.Process(self.proc.pid))
        self._threads = [threading.Thread(target=self._sample, daemon=True)]
        if shielded:
            self._threads.append(threading.Thread(target=self._read_stdout, daemon=True))
        for t in self._threads:
            t.start()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def _read_stdout(self) -> None:
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self._out.write(line + "\n")
            if self.starting_line_s is None and STARTING_LINE.search(line):
                self.starting_line_s = self.elapsed()
            if self.ready is None and (ready := ShieldStatus.from_ready_line(line)) is not None:
                self.ready_line_s = self.elapsed()
                self.ready = ready

    def _sample(self) -> None:
        engine: psutil.Process | None = None
        while not self._stopping.is_set() and self.proc.poll() is None:
            rss = 0
            for p in self.tree.record():
                try:
                    rss += p.memory_info().rss
                    if engine is None and is_engine_core(p):
                        engine = p
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            self.sample.peak_rss = max(self.sample.peak_rss, rss)
            if engine is not None:
                try:
                    self.sample.engine_rss = engine.memory_info().rss
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    engine = None
                self.sample.peak_engine_rss = max(self.sample.peak_engine_rss, self.sample.engine_rss)
            time.sleep(SAMPLE_S)

    def wait_ready(self) -> dict:
        """Block until /health answers (and, shielded, the proven-ready line); the start's timings."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        why = wait_healthy(self.base_url + "/health", self.proc, deadline, SAMPLE_S)
        if why == "exited":
            raise ServerFailed(f"kvshield: the {self.kind} server exited (code {self.proc.returncode}) while starting; log: {self.log_path}")
        if why == "timeout":
            raise ServerFailed(f"kvshield: the {self.kind} server was not ready within {READY_TIMEOUT_S:.0f} s; log: {self.log_path}")
        health_s = self.elapsed()
        while self.mode is not None and self.ready is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ServerFailed(f"kvshield: `kvshield serve` never reported ready (code {self.proc.poll()}); log: {self.log_path}")
            time.sleep(SAMPLE_S)
        self._check_shield_state()
        return {
            "health_ready_s": health_s,
            # `kvshield serve` may print its ready line before this poll sees /health: ready is the later of both
            "proven_ready_s": health_s if self.mode is None else max(health_s, self.ready_line_s),
            "vllm_server_started_s": 0.0 if self.mode is None else self.starting_line_s,
            "peak_rss_bytes_at_ready": self.sample.peak_rss,
            "engine_rss_bytes_at_ready": self.sample.engine_rss,
            "started_own_ray": self.started_own_ray(),
        }

    def _check_shield_state(self) -> None:
        if self.mode is not None:
            problem = self.ready.mismatch(self.mode)
            if problem is not None:
                raise ServerFailed(f"kvshield: the shielded server reports {problem}; log: {self.log_path}")
        elif any(ShieldStatus.from_log_line(line) for line in self.read_log().splitlines()):
            raise ServerFailed(f"kvshield: the plain server logged 'shield active'; log: {self.log_path}")

    def started_own_ray(self) -> bool:
        return any(p.name().startswith("gcs_server") for p in self.tree.alive())

    def read_log(self) -> str:
        self._out.flush()
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def kv_capacity_tokens(self) -> int | None:
        """The capacity vLLM logged ("... KV cache size: N tokens")."""
        match = KV_CAPACITY_LINE.search(self.read_log())
        return int(match["tokens"].replace(",", "")) if match else None

    def material_line(self) -> dict | None:
        """Mode per-request: what the worker logged of one request's matrices (None for other modes)."""
        match = MATERIAL_LINE.search(self.read_log())
        return None if match is None else {"row_mib": float(match["mib"]), "max_rows": int(match["rows"])}

    def stop(self) -> None:
        """SIGTERM (a clean shutdown), then SIGKILL the session, then any process of the tree left behind."""
        self._stopping.set()
        stop_session(self.proc, self.tree, STOP_GRACE_S)
        for t in self._threads:
            t.join(5)
        self._out.close()
