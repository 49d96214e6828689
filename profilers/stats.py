"""Latency statistics and paired speedups with a distribution-free confidence interval."""

from __future__ import annotations

import math

import numpy as np


def summary(latencies_ms, batch_size: int) -> dict:
    a = np.asarray(latencies_ms, dtype=np.float64)
    if a.size == 0:
        raise ValueError("no latency samples")
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    mean = float(a.mean())
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": mean,
            "std": float(a.std(ddof=1)) if a.size > 1 else 0.0, "min": float(a.min()), "max": float(a.max()),
            "n": int(a.size), "throughput_ips": batch_size * 1000.0 / mean}


def _binom_cdf(k: int, n: int) -> float:
    """P(B <= k) for B ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(0, k + 1)) / 2 ** n


def median_ci(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """(low, high, achieved coverage): the order-statistic interval [x_(j), x_(n-j+1)] for the median,
    the narrowest whose exact binomial coverage is at least `confidence` (or j = 1 when n is too small)."""
    x = np.sort(np.asarray(values, dtype=np.float64))
    n = x.size
    if n == 0:
        raise ValueError("no values")
    best = 1
    for j in range(1, n // 2 + 1):
        if 1 - 2 * _binom_cdf(j - 1, n) >= confidence:
            best = j
        else:
            break
    cover = 1 - 2 * _binom_cdf(best - 1, n)
    return float(x[best - 1]), float(x[n - best]), float(cover)


def paired_speedup(baseline_rounds, target_rounds, confidence: float = 0.95) -> dict:
    """Speedup = median over rounds of baseline/target (each round's median latencies, measured back to
    back), so slow drift of the machine cancels within a pair."""
    b = np.asarray(baseline_rounds, dtype=np.float64)
    t = np.asarray(target_rounds, dtype=np.float64)
    ratios = b / t
    lo, hi, cover = median_ci(ratios, confidence)
    return {"median": float(np.median(ratios)), "ci_low": lo, "ci_high": hi, "confidence": round(cover, 4),
            "significant": not (lo <= 1.0 <= hi), "rounds": int(ratios.size), "ratios": [float(r) for r in ratios]}
