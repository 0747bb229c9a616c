"""Medians, spreads and ratios of benchmark runs."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Summary:
    median: float
    min: float
    max: float
    n: int

    def as_dict(self) -> dict[str, float | int]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}


def summarize(values: Sequence[float]) -> Summary | None:
    """Median and min-max; None when there is nothing to summarize."""
    clean = [float(v) for v in values if v is not None]
    if not clean:
        return None
    return Summary(statistics.median(clean), min(clean), max(clean), len(clean))


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator/denominator, None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def summarize_runs(
    runs: Iterable[Mapping[str, object]],
) -> dict[str, dict[str, Summary]]:
    """{contestant: {metric: Summary}} from runs shaped {"contestant", "metrics"}.

    Failed runs carry no metrics and so do not pull a median down.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        metrics = run.get("metrics") or {}
        assert isinstance(metrics, Mapping)
        per = values.setdefault(str(run["contestant"]), {})
        for name, value in metrics.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                per.setdefault(name, []).append(float(value))
    out: dict[str, dict[str, Summary]] = {}
    for contestant, metrics_values in values.items():
        out[contestant] = {}
        for name, vals in metrics_values.items():
            s = summarize(vals)
            if s is not None:
                out[contestant][name] = s
    return out


def ratios_of(
    summaries: Mapping[str, Mapping[str, Summary]],
    subject: str = "edgeward",
    peers: Sequence[str] = ("direct", "haproxy", "nginx"),
) -> dict[str, dict[str, float | None]]:
    """{metric: {"edgeward/peer": median ratio}} for every metric the subject has."""
    mine = summaries.get(subject, {})
    out: dict[str, dict[str, float | None]] = {}
    metrics = sorted({m for per in summaries.values() for m in per})
    for metric in metrics:
        row: dict[str, float | None] = {}
        for peer in peers:
            a = mine.get(metric)
            b = summaries.get(peer, {}).get(metric)
            row[f"{subject}/{peer}"] = ratio(a.median if a else None, b.median if b else None)
        out[metric] = row
    return out
