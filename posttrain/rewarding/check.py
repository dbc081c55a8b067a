"""`posttrain rewards check`: a whole data set through one reward, summarised (count, mean, histogram, errors)."""
from __future__ import annotations

import dataclasses
import math
from collections import Counter

from posttrain.rewarding.combining import mean_std
from posttrain.rewarding.executors import score_batch
from posttrain.rewarding.loading import load_rewards
from posttrain.rewarding.spec import RewardSpec


def check_reward(spec: RewardSpec, prompts: list, completions: list, columns: dict[str, list],
                 batch_size: int = 64) -> dict:
    """Score a whole data set with one reward (in batches; errors counted, not raised) and summarise it.

    A batch whose call fails as a whole is scored again one sample at a time, so the errors land on the
    samples that cause them.

    >>> s = check_reward(RewardSpec("gsm8k"), ["q"] * 3, ["#### 4", "#### 5", "no"], {"answer": ["#### 4"] * 3})
    >>> s["count"], s["mean"], s["histogram"]
    (3, 0.3333333333333333, [[0.0, 2], [1.0, 1]])
    """
    reward = load_rewards([dataclasses.replace(spec, on_error="none")], "reward", "command line")[0]
    values: list[float | None] = []
    failed: set[int] = set()
    messages: Counter = Counter()

    def run(lo: int, hi: int, size: int) -> None:
        batch = score_batch([reward], prompts[lo:hi], completions[lo:hi], {k: v[lo:hi] for k, v in columns.items()},
                            log_errors=False)
        if size > 1 and any(err.index is None for err in batch.errors):
            for i in range(lo, hi):
                run(i, i + 1, 1)
            return
        values.extend(batch.values[reward.label])
        for err in batch.errors:
            failed.update(range(lo, hi) if err.index is None else [lo + err.index])
            messages[err.detail.splitlines()[0][:200]] += 1

    try:
        for lo in range(0, len(completions), batch_size):
            run(lo, min(lo + batch_size, len(completions)), batch_size)
    finally:
        reward.close()
    return _summary(reward.label, values, failed, messages)


def _summary(label: str, values: list[float | None], failed: set[int], messages: Counter) -> dict:
    scored = [v for i, v in enumerate(values) if v is not None and i not in failed]
    mean, std = mean_std(scored)
    distinct = sorted(set(scored))
    if len(distinct) <= 10:
        histogram = [[v, scored.count(v)] for v in distinct]
    else:
        lo, hi = distinct[0], distinct[-1]
        width = (hi - lo) / 10
        counts = [0] * 10
        for v in scored:
            counts[min(int((v - lo) / width), 9)] += 1
        histogram = [[f"[{lo + k * width:.4g}, {lo + (k + 1) * width:.4g}{']' if k == 9 else ')'}", c]
                     for k, c in enumerate(counts)]
    return {"reward": label, "count": len(values), "scored": len(scored), "mean": mean, "std": std,
            "min": min(scored) if scored else math.nan, "max": max(scored) if scored else math.nan,
            "abstained": sum(v is None for i, v in enumerate(values) if i not in failed), "errors": len(failed),
            "histogram": histogram, "error_messages": [[m, c] for m, c in messages.most_common(5)]}


def format_summary(s: dict) -> str:
    """The `posttrain rewards check` report."""
    lines = [f"reward {s['reward']}: {s['count']} completions, {s['scored']} scored, {s['abstained']} abstained, "
             f"{s['errors']} errors",
             f"  mean {s['mean']:.4f}  std {s['std']:.4f}  min {s['min']:.4g}  max {s['max']:.4g}",
             "  histogram:"]
    peak = max([c for _, c in s["histogram"]] or [1])
    for value, count in s["histogram"]:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        lines.append(f"    {shown:>20}  {count:6d}  {'#' * max(1 if count else 0, round(40 * count / peak))}")
    for message, count in s["error_messages"]:
        lines.append(f"  error x{count}: {message}")
    return "\n".join(lines)
