"""Summary statistics of repeated measurements (pure; no numpy needed).

    spread([1.0, 2.0, 4.0])  # {"min": 1.0, "q1": 1.5, "median": 2.0, "q3": 3.0, "max": 4.0, "n": 3}
"""

import math


def quantile(values: list[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default), q in [0, 1]."""
    assert values, "quantile of no values"
    assert 0.0 <= q <= 1.0, f"quantile {q} outside [0, 1]"
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: list[float]) -> float:
    return quantile(values, 0.5)


def spread(values: list[float]) -> dict:
    """Min, quartiles, median, max and count."""
    return {
        "min": min(values),
        "q1": quantile(values, 0.25),
        "median": median(values),
        "q3": quantile(values, 0.75),
        "max": max(values),
        "n": len(values),
    }


def percentiles(values: list[float], points: tuple[float, ...] = (50, 90, 99)) -> dict:
    """{"p50": ..., "p90": ..., "p99": ...} of the values."""
    return {f"p{p:g}": quantile(values, p / 100) for p in points}
