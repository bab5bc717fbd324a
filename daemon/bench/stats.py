"""The statistics the benchmarks report: medians, percentiles, paired ratios, gaps."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], fraction: float) -> float:
    """The value at `fraction` of the sorted values (nearest rank)."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def gap_p99_ms(arrivals: Sequence[float]) -> float | None:
    """p99 of the times between consecutive arrivals, in ms (None with fewer than two)."""
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(arrivals)]
    return round(percentile(gaps, 0.99), 2) if gaps else None


def median_or_none(values: Sequence[float | None]) -> float | None:
    """Median of the values that exist, rounded to 0.01; None when none does."""
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def median(values: Sequence[float], digits: int = 2) -> float:
    return round(statistics.median(values), digits)


@dataclass(frozen=True)
class Ratio:
    """Two series measured in the same repetitions, compared two ways."""

    of_medians: float
    median_of_pairs: float  # each repetition's own ratio first: cancels slow drifts


def paired_ratio(numerators: Sequence[float], denominators: Sequence[float], digits: int) -> Ratio:
    pairs = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return Ratio(
        round(statistics.median(numerators) / statistics.median(denominators), digits),
        round(statistics.median(pairs), digits),
    )
