"""Start-up: time from process start to ready, and peak memory, plain vLLM vs `kvshield serve --mode M`;
and the enclave's per-layer transform time.

Ready means /health answers; for `kvshield serve` also "proven ready" (its workers' shield line
checked, the moment it prints "kvshield: ready at"). Memory is the peak over the samples of the
sum of RSS over the server's process tree (Ray's processes included when the server started Ray;
shared pages count once per process, as RSS does).

    server, record = start("per-request", model, settings, log_dir, tag="round0")   # started, waited for, measured
    summary = summarize({"plain": [record, ...], "per-request": [...]})   # overhead["per-request"]: vs plain
"""

from . import machine, stats
from .servers import PLAIN, ServerProcess


def measure(server: ServerProcess, ray_clusters_before: int) -> dict:
    """Wait for the server; its start-up record."""
    record = server.wait_ready()
    record["kv_capacity_tokens"] = server.kv_capacity_tokens()
    line = server.material_line()
    if line is not None:  # mode per-request
        record["material_line"] = line
    record["ray_clusters_before_start"] = ray_clusters_before
    return record


def start(kind: str, model: str, settings, log_dir: str, tag: str) -> tuple[ServerProcess, dict]:
    """Start one server and wait until it is ready: the process and its start-up record."""
    before = machine.ray_clusters()
    server = ServerProcess(kind, model, settings, log_dir, tag)
    try:
        return server, measure(server, before)
    except BaseException:
        server.stop()
        raise


FIGURES = ("health_ready_s", "proven_ready_s", "vllm_server_started_s", "peak_rss_bytes_at_ready", "peak_rss_bytes",
           "engine_rss_bytes_at_ready", "peak_engine_rss_bytes")


def summarize(records: dict[str, list[dict]]) -> dict:
    """Per kind: medians over starts; per shielded kind, its overheads over plain."""
    out = {}
    for kind, runs in records.items():
        out[kind] = {key: stats.median([r[key] for r in runs]) for key in FIGURES}
        out[kind]["runs"] = len(runs)
        out[kind]["health_ready_s_all"] = [r["health_ready_s"] for r in runs]
        out[kind]["started_own_ray"] = [r["started_own_ray"] for r in runs]
        out[kind]["ray_clusters_before_start"] = [r["ray_clusters_before_start"] for r in runs]
    plain = out.get(PLAIN)
    if plain is not None:
        out["overhead"] = {kind: _overhead(plain, x) for kind, x in out.items() if kind != PLAIN}
    return out


def _overhead(plain: dict, shielded: dict) -> dict:
    return {
        "health_ready": shielded["health_ready_s"] / plain["health_ready_s"] - 1.0,
        "proven_ready": shielded["proven_ready_s"] / plain["proven_ready_s"] - 1.0,
        # from the end of `kvshield serve`'s checks (its server process imported vLLM during them)
        "vllm_server_only": (shielded["health_ready_s"] - shielded["vllm_server_started_s"]) / plain["health_ready_s"] - 1.0,
        "peak_rss": shielded["peak_rss_bytes"] / plain["peak_rss_bytes"] - 1.0,
        "peak_rss_at_ready": shielded["peak_rss_bytes_at_ready"] / plain["peak_rss_bytes_at_ready"] - 1.0,
    }


def enclave_transforms(infos: dict[str, dict]) -> dict:
    """Per shielded mode: the enclave's per-layer transform seconds (median, max, total over layers)."""
    out = {}
    for mode, info in infos.items():
        seconds = info["transform_seconds"]
        out[mode] = {
            "layers": len(seconds),
            "per_layer_median_s": stats.median(seconds),
            "per_layer_max_s": max(seconds),
            "total_s": sum(seconds),
            "bytes_transformed": info["bytes_transformed"],
        }
    return out
