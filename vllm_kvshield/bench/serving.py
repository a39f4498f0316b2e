"""Serving load on loopback through vLLM's own serving benchmark (vllm.benchmarks.serve.benchmark), swept over
requests in flight.

Each load of the sweep: the shipped chat prompts (chat template applied, /v1/completions, streamed),
each generating exactly output_len tokens (ignore_eos), all sent at once with at most `in_flight`
of them in flight, after `warmups` untimed requests. Reported per load: request and output-token
throughput, TTFT / TPOT / ITL / end-to-end latency percentiles, and the preemptions vLLM counted
meanwhile (/metrics): a load that preempted did not hold all its requests in the KV cache at once.

    loads = run_sweep(server.base_url, tokenizer, settings, log_file)   # {"1": {...}, "8": {...}, ...}
    summary = summarize({"plain": [loads, ...], "per-request": [loads, ...]})
"""

import asyncio
import contextlib
import re
import urllib.request

from ..default_model import MODEL_NAME
from . import stats
from .servers import PLAIN
from .settings import Settings
from .throughput import chat_texts

PERCENTILES = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
KEPT = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput")
RATIOS = ("request_throughput", "output_throughput", "p50_ttft_ms", "p50_tpot_ms", "p50_e2el_ms")
PREEMPTIONS = re.compile(r"^vllm:num_preemptions_total(?:\{[^}]*\})? (?P<count>[\d.e+]+)$", re.MULTILINE)
# mode per-request: request keys the enclave served, and those it had expanded ahead (kvshield's counters)
REQUEST_KEYS = {name: re.compile(rf"^{name}_total (?P<count>[\d.e+]+)$", re.MULTILINE)
                for name in ("kvshield_request_keys", "kvshield_request_keys_ready")}
METRICS_TIMEOUT_S = 30.0


def sample_requests(tokenizer, count: int, output_len: int) -> list:
    from vllm.benchmarks.datasets import SampleRequest

    return [
        SampleRequest(
            prompt=text,
            prompt_len=len(tokenizer.encode(text, add_special_tokens=False)),
            expected_output_len=output_len,
        )
        for text in chat_texts(count, tokenizer)
    ]


def counters(base_url: str) -> dict[str, int]:
    """From one scrape: vLLM's count of preempted requests since the server started and, on a per-request server,
    kvshield's request key counters."""
    with urllib.request.urlopen(base_url + "/metrics", timeout=METRICS_TIMEOUT_S) as response:
        text = response.read().decode("utf-8")
    counts = [float(m["count"]) for m in PREEMPTIONS.finditer(text)]
    if not counts:
        raise RuntimeError(f"kvshield: {base_url}/metrics has no vllm:num_preemptions_total")
    out = {"preemptions": int(sum(counts))}
    for name, pattern in REQUEST_KEYS.items():
        if m := pattern.search(text):
            out[name] = int(float(m["count"]))
    return out


def run_load(base_url: str, tokenizer, requests: list, in_flight: int, settings: Settings, log_file) -> dict:
    """One benchmark run against a ready server; its output (vLLM's printout) goes to log_file."""
    from vllm.benchmarks.serve import TaskType, benchmark

    coroutine = benchmark(
        task_type=TaskType.GENERATION,
        endpoint_type="openai",
        api_url=base_url + "/v1/completions",
        base_url=base_url,
        model_id=MODEL_NAME,
        model_name=MODEL_NAME,
        tokenizer=tokenizer,
        input_requests=requests,
        logprobs=None,
        request_rate=float("inf"),
        burstiness=1.0,
        disable_tqdm=True,
        num_warmups=settings.serving_warmups,
        profile=False,
        selected_percentile_metrics=list(LATENCY_METRICS),
        selected_percentiles=list(PERCENTILES),
        ignore_eos=True,
        goodput_config_dict={},
        max_concurrency=in_flight,
        lora_modules=None,
        extra_headers=None,
        extra_body={"temperature": 1.0, "top_p": 1.0},
        ready_check_timeout_sec=600,  # the server already answered /health; a busy machine may still be slow
    )
    before = counters(base_url)
    with contextlib.redirect_stdout(log_file), contextlib.redirect_stderr(log_file):
        result = asyncio.run(coroutine)
    if result["failed"]:
        errors = sorted({e for e in result["errors"] if e})
        raise RuntimeError(f"kvshield: {result['failed']} serving requests failed: {errors[:3]}")
    kept = {k: result[k] for k in KEPT}
    for metric in LATENCY_METRICS:
        kept[f"mean_{metric}_ms"] = result[f"mean_{metric}_ms"]
        for p in PERCENTILES:
            kept[f"p{p:g}_{metric}_ms"] = result[f"p{p:g}_{metric}_ms"]
    kept["in_flight"] = in_flight
    after = counters(base_url)
    for name, value in after.items():  # the warm-up requests' included
        kept[name] = value - before[name]
    return kept


def run_sweep(base_url: str, tokenizer, settings: Settings, log_file, log=None) -> dict[str, dict]:
    """Every load of settings.serving_sweep against one server, in order: {str(in_flight): record}."""
    out = {}
    for in_flight, count in settings.serving_sweep:
        if log is not None:
            log(f"servers: {count} requests, at most {in_flight} in flight")
        requests = sample_requests(tokenizer, count, settings.serving_output_len)
        out[str(in_flight)] = run_load(base_url, tokenizer, requests, in_flight, settings, log_file)
    return out


def summarize(runs: dict[str, list[dict[str, dict]]]) -> dict:
    """runs[kind][round][in_flight]: per kind and in-flight count, medians over rounds of every kept figure;
    per shielded kind and in-flight count, the median over rounds of its ratio to plain's load of the same round."""
    out: dict = {}
    for kind, rounds in runs.items():
        out[kind] = {
            point: {**{key: stats.median([r[point][key] for r in rounds]) for key in rounds[0][point]}, "runs": len(rounds)}
            for point in rounds[0]
        }
    plain = runs.get(PLAIN)
    if plain is not None:
        out["ratio_to_plain"] = {
            kind: {point: _ratios(plain, rounds, point) for point in rounds[0]} for kind, rounds in runs.items() if kind != PLAIN
        }
    return out


def _ratios(plain: list[dict], shielded: list[dict], point: str) -> dict:
    """Per figure of RATIOS: the median over rounds of shielded / plain (round r against round r); with its spread."""
    out = {}
    for key in RATIOS:
        per_round = [s[point][key] / p[point][key] for p, s in zip(plain, shielded)]
        out[key] = stats.median(per_round)
        out[f"{key}_spread"] = stats.spread(per_round)
    return out
