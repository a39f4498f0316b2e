"""Served throughput at one in-flight count, more loads than `kvshield bench`'s sweep, with the CPU each
process of the server used: plain vLLM and `kvshield serve --mode per-request`, alternately.

Per round and kind: start the server (bench/servers.py, the bench's arguments), 8 untimed requests,
then `--loads` loads of `--requests` chat requests at most `--in-flight` in flight (vLLM's serving
benchmark, bench/serving.py), reading each process's CPU seconds (psutil) before and after each load.

    python benchmarks/served_probe.py --out benchmarks/results/served_probe.json --rounds 2 --loads 3
"""

import argparse
import json
import os
import sys
import tempfile
import time

import psutil
from transformers import AutoTokenizer

from vllm_kvshield.bench import serving, stats
from vllm_kvshield.bench.servers import ServerProcess
from vllm_kvshield.bench.settings import profile
from vllm_kvshield.default_model import model_path

KINDS = ("plain", "per-request")


def cpu_seconds(tree) -> dict[str, float]:
    """Process title:pid -> user + system CPU seconds, for every live process of the server's tree."""
    out = {}
    for p in tree.alive():
        try:
            t = p.cpu_times()
            out[f"{p.name()}:{p.pid}"] = t.user + t.system
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the result's JSON file")
    parser.add_argument("--logs", default=None, help="folder for the servers' logs (default: a new temporary folder)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--loads", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    args = parser.parse_args()
    logs = args.logs or tempfile.mkdtemp(prefix="kvshield-probe-")
    os.makedirs(logs, exist_ok=True)
    settings = profile("full", modes=("none", "per-request"), sections=("servers",))
    model = str(model_path())
    tokenizer = AutoTokenizer.from_pretrained(model)
    loads = []
    for r in range(args.rounds):
        for kind in KINDS:
            server = ServerProcess(kind, model, settings, logs, f"r{r}")
            try:
                server.wait_ready()
                with open(os.path.join(logs, "loads.log"), "a", encoding="utf-8") as log:
                    serving.run_load(server.base_url, tokenizer, serving.sample_requests(tokenizer, 8, 16), 8, settings, log)
                    for i in range(args.loads):
                        requests = serving.sample_requests(tokenizer, args.requests, settings.serving_output_len)
                        before, t0 = cpu_seconds(server.tree), time.perf_counter()
                        got = serving.run_load(server.base_url, tokenizer, requests, args.in_flight, settings, log)
                        wall, after = time.perf_counter() - t0, cpu_seconds(server.tree)
                        cpu = {k: round(after[k] - before[k], 2) for k in after if k in before and after[k] - before[k] >= 0.05}
                        loads.append({"round": r, "kind": kind, "load": i, "wall_s": round(wall, 2),
                                      "requests_per_s": got["request_throughput"], "p50_tpot_ms": got["p50_tpot_ms"],
                                      "p50_ttft_ms": got["p50_ttft_ms"], "cpu_s": cpu})
                        print(json.dumps(loads[-1]), flush=True)
            finally:
                server.stop()
    medians = {kind: {key: stats.median([x[key] for x in loads if x["kind"] == kind])
                      for key in ("requests_per_s", "p50_tpot_ms", "p50_ttft_ms")} for kind in KINDS}
    result = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "in_flight": args.in_flight, "requests": args.requests, "loads": loads, "medians": medians,
        "ratio_requests_per_s": medians["per-request"]["requests_per_s"] / medians["plain"]["requests_per_s"],
        "ratio_p50_tpot": medians["per-request"]["p50_tpot_ms"] / medians["plain"]["p50_tpot_ms"],
        "ratio_p50_ttft": medians["per-request"]["p50_ttft_ms"] / medians["plain"]["p50_ttft_ms"],
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "loads"}, indent=1))


if __name__ == "__main__":
    main()
