"""Quality per mode against plain, teacher-forced on the shipped text (issue 3's report figures).

Every engine scores the same chunks through vLLM's prompt logprobs (vllm_kvshield.quality):
perplexity, top-1 agreement with plain and mean |logprob - plain logprob| per mode.

    report = run(engines.llms, tokenizer, settings)   # {"none": {...}, "mix": {...}}
"""

from .. import data
from ..quality import compare, score, text_chunks
from .settings import PLAIN, Settings


def run(llms: dict, tokenizer, settings: Settings) -> dict:
    chunks = text_chunks(tokenizer, data.text(settings.quality_text), settings.quality_chunks, settings.quality_length)
    plain = score(llms[PLAIN], chunks)
    out = {}
    for mode in settings.modes:
        other = plain if mode == PLAIN else score(llms[mode], chunks)
        out[mode] = {
            **compare(plain, other),
            "text": settings.quality_text,
            "chunks": settings.quality_chunks,
            "chunk_tokens": settings.quality_length,
            "dtype": settings.dtype,
        }
    return out
