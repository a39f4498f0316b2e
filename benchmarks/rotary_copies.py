"""Why `permute` and `mix-v` measure faster than plain vLLM: a control with per-layer rotary copies.

vLLM's Llama shares one rotary module across its layers; a shielded model gives each layer its own
copy (its table permuted). This runs, interleaved in one process like the bench's offline section
(same prompt sets, sampling and rotation): `none` (plain vLLM), `copies` (plain vLLM whose layers
each own an unpermuted copy of the same module: no key, no Ray, no transform; see
rotary_copies_worker.py), and `permute`, with the control built first or last (--control-first).

    .venv/bin/python benchmarks/rotary_copies.py --out benchmarks/results
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CONTROL = "copies"


def build(model: str, settings, variant: str):
    from vllm import LLM

    from vllm_kvshield.bench.engines import engine_options

    options = engine_options(settings, "none" if variant == CONTROL else variant)
    if variant == CONTROL:
        options["worker_extension_cls"] = "rotary_copies_worker.PerLayerRotaryCopies"
    return LLM(model, **options)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--control-first", action="store_true", help="build the control engine before plain vLLM")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from vllm_kvshield.bench import stats
    from vllm_kvshield.bench.settings import profile
    from vllm_kvshield.bench.throughput import build_prompt_sets, generate_timed, rotated
    from vllm_kvshield.default_model import model_path

    # the workers import the control's and the probe's modules by name; each shielded engine starts its own Ray
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
    os.environ["RAY_ADDRESS"] = "local"
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # LLM.apply_model: count each engine's rotary modules
    settings = profile("full", modes=("none", "permute"))
    model = str(model_path())
    sets = build_prompt_sets(AutoTokenizer.from_pretrained(model), settings)
    variants = (CONTROL, "none", "permute") if args.control_first else ("none", CONTROL, "permute")
    llms = {v: build(model, settings, v) for v in variants}
    from rotary_copies_probe import rotary_modules  # the workers import it from PYTHONPATH

    modules = {v: llm.apply_model(rotary_modules)[0] for v, llm in llms.items()}
    layers = max(modules.values())
    expected = {"none": 1, CONTROL: layers, "permute": layers}
    if modules != expected:
        raise RuntimeError(f"rotary modules per engine {modules}, expected {expected}: the control is not what it claims")

    for llm in llms.values():  # untimed warm-up pass
        for s in sets:
            generate_timed(llm, s, settings.seed)
    seconds = {v: [] for v in variants}
    tokens = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in rotated(variants, r):
            runs = [generate_timed(llms[v], s, settings.seed) for s in sets]
            seconds[v].append(sum(x["seconds"] for x in runs))
            tokens[v].append(sum(x["prompt_tokens"] + x["output_tokens"] for x in runs))
        print(f"round {r}: " + ", ".join(f"{v} {seconds[v][-1]:.2f} s" for v in variants), file=sys.stderr, flush=True)

    def ratios(v: str, base: str) -> list[float]:  # throughput of v over base, per round
        return [(tokens[v][i] / seconds[v][i]) / (tokens[base][i] / seconds[base][i]) for i in range(args.rounds)]

    result = {
        "generated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python", "benchmarks/rotary_copies.py", *sys.argv[1:]]),
        "build_order": list(variants),
        "rotary_modules": modules,
        "sets": [s.spec.name for s in sets],
        "rounds": args.rounds,
        "seconds": seconds,
        "ratio_to_none": {v: ratios(v, "none") for v in variants},
        "ratio_to_copies": {v: ratios(v, CONTROL) for v in variants},
    }
    os.makedirs(args.out, exist_ok=True)
    name = "rotary_copies_control_first" if args.control_first else "rotary_copies"
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump(result, f, indent=1)
    for base in ("none", CONTROL):
        for v in variants:
            r = result[f"ratio_to_{base}"][v]
            print(f"{v} / {base}: median {stats.median(r):.4f}, min-max [{min(r):.4f}, {max(r):.4f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
