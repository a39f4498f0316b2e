"""Serving load on loopback through vLLM's own serving benchmark (vllm.benchmarks.serve.benchmark).

The requests are the shipped chat prompts (chat template applied, /v1/completions, streamed),
each generating exactly output_len tokens (ignore_eos), all sent at once with at most
`concurrency` in flight, after `warmups` untimed requests. Reported per run: request and
output-token throughput, TTFT / TPOT / ITL / end-to-end latency percentiles.

    result = run_load(server.base_url, model_path, settings, log_file)
    summary = summarize(runs_by_kind)
"""

import asyncio
import contextlib

from ..default_model import MODEL_NAME
from . import stats
from .settings import Settings
from .throughput import chat_texts

PERCENTILES = (50.0, 90.0, 99.0)
LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
KEPT = ("duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
        "output_throughput", "total_token_throughput")


def sample_requests(tokenizer, settings: Settings) -> list:
    from vllm.benchmarks.datasets import SampleRequest

    return [
        SampleRequest(
            prompt=text,
            prompt_len=len(tokenizer.encode(text, add_special_tokens=False)),
            expected_output_len=settings.serving_output_len,
        )
        for text in chat_texts(settings.serving_requests, tokenizer)
    ]


def run_load(base_url: str, tokenizer, requests: list, settings: Settings, log_file) -> dict:
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
        max_concurrency=settings.serving_concurrency,
        lora_modules=None,
        extra_headers=None,
        extra_body={"temperature": 1.0, "top_p": 1.0},
        ready_check_timeout_sec=600,  # the server already answered /health; a busy machine may still be slow
    )
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
    return kept


def summarize(runs: dict[str, list[dict]]) -> dict:
    """Per kind: medians over runs of every kept figure; and shielded / plain ratios of the medians."""
    out = {}
    for kind, records in runs.items():
        out[kind] = {key: stats.median([r[key] for r in records]) for key in records[0]}
        out[kind]["runs"] = len(records)
    if "plain" in out and "shielded" in out:
        plain, shielded = out["plain"], out["shielded"]
        out["ratio_shielded_to_plain"] = {
            "request_throughput": shielded["request_throughput"] / plain["request_throughput"],
            "output_throughput": shielded["output_throughput"] / plain["output_throughput"],
            **{
                f"p50_{m}": shielded[f"p50_{m}_ms"] / plain[f"p50_{m}_ms"]
                for m in LATENCY_METRICS
            },
        }
    return out
