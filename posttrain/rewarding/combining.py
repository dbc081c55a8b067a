"""The rewards of one batch combined: the weighted total per sample, and the metrics of every function.

Combining (`combine`, TRL's rule, a nansum): None means the function abstains for that sample; total = sum over the
functions that did not abstain of weight * value; a sample where all abstain gets 0.0.

Metrics (`reward_metrics`): reward/<label>/mean and /std (population std over the values that are not None),
/abstained (fraction None), /errors (count), /seconds (wall time of the call), and reward/mean, reward/std of the
total. With several processes, each computes its own; gather values first for exact global statistics.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from posttrain.rewarding.executors import RewardError


@dataclass
class RewardBatch:
    """Rewards of one batch: the weighted total, each function's values, the reported errors, timings."""

    total: list[float]                                  # [B]
    values: dict[str, list[float | None]]               # label -> [B]; None = abstained
    errors: list[RewardError] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def combine(values: dict[str, list[float | None]], weights: dict[str, float]) -> list[float]:
    """Weighted total per sample; None abstains (left out of the sum).

    >>> combine({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 1.0, "b": 0.5})
    [1.25, 0.5, 0.0]
    """
    if not values:
        return []
    n = len(next(iter(values.values())))
    return [float(sum(weights[k] * v[i] for k, v in values.items() if v[i] is not None)) for i in range(n)]


def reward_metrics(batch: RewardBatch, prefix: str = "reward") -> dict[str, float]:
    """reward/<label>/{mean,std,abstained,errors,seconds} and reward/{mean,std}.

    >>> m = reward_metrics(RewardBatch([1.0, 0.0], {"gsm8k": [1.0, None]}))
    >>> m["reward/gsm8k/mean"], m["reward/gsm8k/abstained"], m["reward/mean"], m["reward/std"]
    (1.0, 0.5, 0.5, 0.5)
    """
    out: dict[str, float] = {}
    for label, vals in batch.values.items():
        present = [v for v in vals if v is not None]
        mean, std = mean_std(present)
        out[f"{prefix}/{label}/mean"], out[f"{prefix}/{label}/std"] = mean, std
        out[f"{prefix}/{label}/abstained"] = (len(vals) - len(present)) / len(vals) if vals else 0.0
        out[f"{prefix}/{label}/errors"] = float(sum(e.reward == label for e in batch.errors))
        if label in batch.seconds:
            out[f"{prefix}/{label}/seconds"] = batch.seconds[label]
    out[f"{prefix}/mean"], out[f"{prefix}/std"] = mean_std(batch.total)
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and population standard deviation; NaN for an empty list."""
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
