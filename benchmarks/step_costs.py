"""Where a per-request step's time goes, in one process on one core: vLLM's CPU attention (and its KV cache
write), the mix and un-mix kernels, and the whole generate call, plain vs per-request, same prompts.

Each mode runs in a child process pinned to core 0 with vLLM's engine in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0), so the timers wrap the Python entry points of every call:
CPUAttentionBackendImpl.forward / do_kv_cache_update and kernels.VectorStep.mix / product. 32 random
prompts of 128 tokens, 128 tokens each (greedy, ignore_eos), one untimed warm-up, then `--rounds` rounds.

    python benchmarks/step_costs.py --out benchmarks/results/step_costs.json
"""

import argparse
import collections
import json
import os
import random
import subprocess
import sys
import time

from vllm_kvshield.bench import stats

MODES = ("none", "per-request")


def child(mode: str, rounds: int) -> list[dict]:
    os.sched_setaffinity(0, {0})
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends import cpu_attn

    from vllm_kvshield import kernels
    from vllm_kvshield.default_model import model_path

    seconds = collections.Counter()

    def timed(cls, name, key):
        inner = getattr(cls, name)

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                seconds[key] += time.perf_counter() - t0

        setattr(cls, name, wrapper)

    timed(cpu_attn.CPUAttentionBackendImpl, "forward", "attention")
    timed(cpu_attn.CPUAttentionBackendImpl, "do_kv_cache_update", "kv_cache_write")
    timed(kernels.VectorStep, "mix", "mix")
    timed(kernels.VectorStep, "product", "unmix")
    llm = LLM(str(model_path()), dtype="bfloat16", kv_cache_memory_bytes=256 << 20, max_model_len=2048, seed=0,
              additional_config={} if mode == "none" else {"kvshield": {"mode": mode}})
    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(1000, 40000) for _ in range(128)]} for _ in range(32)]
    params = SamplingParams(max_tokens=128, ignore_eos=True, temperature=0.0)
    llm.generate(prompts[:4], params, use_tqdm=False)
    out = []
    for _ in range(rounds):
        seconds.clear()
        t0 = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        out.append({"generate": time.perf_counter() - t0, **seconds})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.rounds)))
        return
    runs = {}
    for mode in MODES:
        done = subprocess.run([sys.executable, __file__, "--out", args.out, "--rounds", str(args.rounds), "--child", mode],
                              check=True, capture_output=True, text=True)
        runs[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    medians = {mode: {k: stats.median([r[k] for r in rounds]) for k in rounds[0]} for mode, rounds in runs.items()}
    result = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]), "runs": runs, "medians": medians,
              "ratio_generate": medians["none"]["generate"] / medians["per-request"]["generate"]}
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"medians": medians, "ratio_generate": result["ratio_generate"]}, indent=1))


if __name__ == "__main__":
    main()
