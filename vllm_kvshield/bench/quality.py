"""Teacher-forced quality through vLLM's prompt logprobs: perplexity, top-1 agreement, logprob drift; per mode against plain.

Greedy continuations of a small model in bf16 diverge under any reordering of a
dot product's summation, so quality is judged teacher-forced: every position of
a fixed text is scored with the true prefix.

    chunks = text_chunks(tokenizer, text, n=8, length=500)
    plain, shielded = score(plain_llm, chunks), score(shielded_llm, chunks)
    compare(plain, shielded)   # {"perplexity": ..., "top1_agreement": ..., "mean_abs_logprob_diff": ...}
    report = run(engines.llms, tokenizer, settings)   # the bench's figures: {"none": {...}, "mix": {...}}
"""

import math
from dataclasses import dataclass

import torch

from .. import data
from ..config import PLAIN_MODE
from .settings import Settings


def text_chunks(tokenizer, text: str, n: int, length: int) -> list[list[int]]:
    """n consecutive token windows of the text, each `length` tokens."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) < n * length:
        raise ValueError(f"text has {len(ids)} tokens, {n} x {length} = {n * length} needed")
    return [ids[i * length : (i + 1) * length] for i in range(n)]


@dataclass
class Scores:
    """Per scored position (all chunks, first token of each excluded): the true token's logprob and the top-1 token."""

    logprobs: torch.Tensor  # [N] fp64
    top1: torch.Tensor  # [N] int64

    @property
    def perplexity(self) -> float:
        return math.exp(-self.logprobs.mean().item())


def score(llm, chunks: list[list[int]]) -> Scores:
    """Score every chunk teacher-forced through the engine's prompt logprobs."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=c) for c in chunks], params, use_tqdm=False)
    logprobs, top1 = [], []
    for chunk, out in zip(chunks, outputs):
        for token, entries in zip(chunk[1:], out.prompt_logprobs[1:]):
            logprobs.append(entries[token].logprob)
            top1.append(next(t for t, e in entries.items() if e.rank == 1))
    return Scores(torch.tensor(logprobs, dtype=torch.float64), torch.tensor(top1))


def compare(plain: Scores, other: Scores) -> dict:
    """Perplexities, their relative difference, top-1 agreement and mean |logprob difference|."""
    assert plain.logprobs.shape == other.logprobs.shape, (plain.logprobs.shape, other.logprobs.shape)
    return {
        "perplexity_plain": plain.perplexity,
        "perplexity": other.perplexity,
        "perplexity_rel_diff": other.perplexity / plain.perplexity - 1.0,
        "top1_agreement": (plain.top1 == other.top1).double().mean().item(),
        "mean_abs_logprob_diff": (plain.logprobs - other.logprobs).abs().mean().item(),
        "positions": int(plain.logprobs.numel()),
    }


def run(llms: dict, tokenizer, settings: Settings) -> dict:
    """Every engine scores the same chunks of the shipped text; each mode compared with plain."""
    chunks = text_chunks(tokenizer, data.text(settings.quality_text), settings.quality_chunks, settings.quality_length)
    plain = score(llms[PLAIN_MODE], chunks)
    out = {}
    for mode in settings.modes:
        other = plain if mode == PLAIN_MODE else score(llms[mode], chunks)
        out[mode] = {
            **compare(plain, other),
            "text": settings.quality_text,
            "chunks": settings.quality_chunks,
            "chunk_tokens": settings.quality_length,
            "dtype": settings.dtype,
        }
    return out
