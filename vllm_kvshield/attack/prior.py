"""A public token-frequency prior: how often each vocabulary token occurs in public English text.

It never looks at the secret prompts. Used to centre features (attack 3).

    p = token_prior(tokenizer, [data.text("alice"), data.text("gpl-3")])   # [V], sums to 1
"""

import torch

SMOOTHING = 0.01  # pseudo-count of every token, so that unseen tokens keep a little mass


def token_prior(tokenizer, texts: list[str], vocab: int | None = None, smoothing: float = SMOOTHING) -> torch.Tensor:
    """Smoothed unigram frequencies [V] of the texts' tokens."""
    if not texts:
        raise ValueError("token_prior needs at least one text")
    size = vocab or len(tokenizer)
    counts = torch.full((size,), smoothing, dtype=torch.float64)
    for text in texts:
        ids = torch.tensor(tokenizer.encode(text, add_special_tokens=False), dtype=torch.long)
        counts += torch.bincount(ids, minlength=size)[:size].double()
    return (counts / counts.sum()).float()


def public_prior(tokenizer, vocab: int) -> torch.Tensor:
    """The prior of the public texts shipped with vllm-kvshield (Alice in Wonderland, GPL-3)."""
    from vllm_kvshield import data

    return token_prior(tokenizer, [data.text(name) for name in data.TEXTS], vocab)
