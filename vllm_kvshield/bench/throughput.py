"""Offline throughput (vLLM's offline path: LLM.generate on a fixed prompt set), interleaved over modes.

After one untimed warm-up pass of every set on every engine, each round runs every set on every mode,
the mode order rotated per round; a mode's ratio in a round is its throughput over the `none` run of
that round (adjacent in time), so slow drifts of the machine cancel. Sampling follows vLLM's
benchmarks/throughput.py: temperature 1, top_p 1, ignore_eos, so every request generates exactly
output_len tokens.

    sets = build_prompt_sets(tokenizer, settings)        # the suite, then the in-flight sets
    runs = run_rounds(engines.llms, sets, settings, log)
    summary = summarize(runs, settings.modes, suite=[s.name for s in settings.prompt_sets])
"""

import time
from dataclasses import dataclass

import torch

from .. import data
from ..config import PLAIN_MODE
from . import stats
from .engines import tree_cpu_seconds
from .settings import PromptSet, Settings

FIRST_RANDOM_TOKEN = 1000  # random prompts avoid the tokenizer's special and byte tokens


@dataclass(frozen=True)
class Prompts:
    spec: PromptSet
    token_ids: list[list[int]]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(t) for t in self.token_ids)


def random_prompts(spec: PromptSet, vocab_size: int, seed: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(FIRST_RANDOM_TOKEN, vocab_size, (spec.prompts, spec.input_len), generator=generator)
    return ids.tolist()


def chat_texts(count: int, tokenizer) -> list[str]:
    """The shipped chat prompts through the model's chat template, cycled to `count`."""
    texts = data.chat_prompts()
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": texts[i % len(texts)]}], tokenize=False, add_generation_prompt=True
        )
        for i in range(count)
    ]


def chat_prompts(spec: PromptSet, tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t, add_special_tokens=False) for t in chat_texts(spec.prompts, tokenizer)]


def build_prompt_sets(tokenizer, settings: Settings) -> list[Prompts]:
    """The suite's sets, then the in-flight sets (each its own seed, by position)."""
    sets = []
    for i, spec in enumerate((*settings.prompt_sets, *settings.in_flight_sets)):
        if spec.kind == "random":
            ids = random_prompts(spec, len(tokenizer), settings.seed + i)
        elif spec.kind == "chat":
            ids = chat_prompts(spec, tokenizer)
        else:
            raise ValueError(f"kvshield: unknown prompt set kind {spec.kind!r}; accepted: random, chat")
        longest = max(len(t) for t in ids) + spec.output_len
        if longest > settings.max_model_len:
            raise ValueError(f"kvshield: set {spec.name} needs {longest} tokens, max_model_len is {settings.max_model_len}")
        sets.append(Prompts(spec, ids))
    return sets


def sampling_params(spec: PromptSet, seed: int):
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=1.0, top_p=1.0, ignore_eos=True, max_tokens=spec.output_len, seed=seed)


def generate_timed(llm, prompts: Prompts, seed: int) -> dict:
    """One timed LLM.generate over the whole set: seconds and token counts."""
    from vllm import TokensPrompt

    requests = [TokensPrompt(prompt_token_ids=t) for t in prompts.token_ids]
    params = sampling_params(prompts.spec, seed)
    t0 = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    seconds = time.perf_counter() - t0
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    expected = prompts.spec.output_len * len(requests)
    assert output_tokens == expected, f"{prompts.spec.name}: {output_tokens} output tokens, expected {expected}"
    return {"seconds": seconds, "prompt_tokens": prompts.prompt_tokens, "output_tokens": output_tokens}


def rotated(modes: tuple[str, ...], round_index: int) -> list[str]:
    k = round_index % len(modes)
    return list(modes[k:] + modes[:k])


def run_rounds(llms: dict, sets: list[Prompts], settings: Settings, log, others: dict | None = None) -> list[dict]:
    """Warm-up pass, then settings.repetitions timed rounds; one record per (round, set, mode).

    others[mode]: the processes that should sit idle while that mode runs (the other engines, with
    their Rays); the CPU they use meanwhile is recorded per run, in cores, so a run slowed by its
    neighbours shows it (all engines share one process and two cores).
    """
    for mode in settings.modes:
        for prompts in sets:
            generate_timed(llms[mode], prompts, settings.seed)
    log(f"throughput: warm-up done; {settings.repetitions} rounds of {len(sets)} sets x {len(settings.modes)} modes")
    others = others or {}
    runs = []
    for r in range(settings.repetitions):
        for prompts in sets:
            for mode in rotated(settings.modes, r):
                neighbours = others.get(mode, [])
                before = tree_cpu_seconds(neighbours)
                run = generate_timed(llms[mode], prompts, settings.seed + r)
                run["others_cpu_cores"] = (tree_cpu_seconds(neighbours) - before) / run["seconds"]
                runs.append({"round": r, "set": prompts.spec.name, "mode": mode, **run})
        log(f"throughput: round {r + 1}/{settings.repetitions} done")
    return runs


def _tokens_per_s(records: list[dict]) -> float:
    return sum(x["prompt_tokens"] + x["output_tokens"] for x in records) / sum(x["seconds"] for x in records)


def _output_tokens_per_s(records: list[dict]) -> float:
    return sum(x["output_tokens"] for x in records) / sum(x["seconds"] for x in records)


def _mode_summary(runs: list[dict], mode: str) -> dict:
    """Medians over rounds of the mode's throughput, and of its per-round ratio to `none`."""
    rounds = sorted({x["round"] for x in runs})
    per_round = {r: [x for x in runs if x["round"] == r and x["mode"] == mode] for r in rounds}
    plain = {r: [x for x in runs if x["round"] == r and x["mode"] == PLAIN_MODE] for r in rounds}
    tps = [_tokens_per_s(per_round[r]) for r in rounds]
    ratios = [_tokens_per_s(per_round[r]) / _tokens_per_s(plain[r]) for r in rounds]
    return {
        "tokens_per_s": stats.median(tps),
        "output_tokens_per_s": stats.median([_output_tokens_per_s(per_round[r]) for r in rounds]),
        "ratio_to_none": stats.median(ratios),
        "ratio_spread": stats.spread(ratios),
        "tokens_per_s_spread": stats.spread(tps),
        "runs": len(rounds),
        "others_cpu_cores": stats.median([x.get("others_cpu_cores", 0.0) for r in rounds for x in per_round[r]]),
    }


def summarize(runs: list[dict], modes: tuple[str, ...], suite: list[str] | None = None) -> dict:
    """Per mode: the suite's sets together (a round's tokens over its seconds; suite None: every set), and per set."""
    out = {}
    sets = list(dict.fromkeys(x["set"] for x in runs))
    together = [x for x in runs if suite is None or x["set"] in suite]
    for mode in modes:
        summary = _mode_summary(together, mode)
        summary["by_set"] = {s: _mode_summary([x for x in runs if x["set"] == s], mode) for s in sets}
        out[mode] = summary
    return out


def decode_step_seconds(llm, vocab_size: int, batch: int, tokens: int, seed: int) -> float:
    """Decode time per step at a batch size: (best time of `tokens` output tokens - best time of 1) / (tokens - 1)."""
    ids = random_prompts(PromptSet("decode", "random", batch, 16, 1), vocab_size, seed)
    one = Prompts(PromptSet(f"decode-{batch}x1", "random", batch, 16, 1), ids)
    many = Prompts(PromptSet(f"decode-{batch}x{tokens}", "random", batch, 16, tokens), ids)
    generate_timed(llm, many, seed)  # warm-up at this batch size
    first = min(generate_timed(llm, one, seed)["seconds"] for _ in range(3))
    full = min(generate_timed(llm, many, seed)["seconds"] for _ in range(3))
    return (full - first) / (tokens - 1)
