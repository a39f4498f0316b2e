"""Per-request recovery rates and their summary: mean and a 95% bootstrap interval over requests.

    rate = recovery_rate(guesses, tokens, positions)     # exact token matches on those positions
    mean, low, high = summarize([0.9, 1.0, 0.95])
"""

import torch

from .observation import NO_GUESS

RESAMPLES = 2000
SEED = 0


def recovery_rate(guesses: torch.Tensor, tokens: list[int], positions: list[int]) -> float:
    """Fraction of `positions` where the guess is the true token (NO_GUESS counts as wrong)."""
    if not positions:
        raise ValueError("no positions to score")
    idx = torch.tensor(positions)
    truth = torch.tensor(tokens)[idx]
    picked = guesses[idx]
    return float(((picked == truth) & (picked != NO_GUESS)).double().mean())


def summarize(rates: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean of the rates and the percentile-bootstrap interval of the mean (resampling requests)."""
    if not rates:
        raise ValueError("no rates to summarize")
    r = torch.tensor(rates, dtype=torch.float64)
    gen = torch.Generator().manual_seed(SEED)
    means = r[torch.randint(len(r), (RESAMPLES, len(r)), generator=gen)].mean(1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return float(r.mean()), low, high
