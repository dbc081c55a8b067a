"""Metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, the accelerate trackers, a progress bar."""
from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLog:
    """Appends to metrics.jsonl (main process only) and forwards to accelerate's trackers."""

    def __init__(self, accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v


class Progress:
    """A tqdm bar over a stage's steps showing loss, tokens/s, held-out accuracy when evaluated and, in RL stages,
    `reward(10)`: the mean reward of the last 10 steps (one step's mean over a few prompts is too noisy to read a
    trend from). tqdm adds the ETA."""

    window = 10

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.rewards: deque[float] = deque(maxlen=self.window)
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not enabled, dynamic_ncols=True,
                        bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def update(self, metrics: dict) -> None:
        shown = {"loss": f"{metrics.get('loss', float('nan')):.4f}", "tok/s": f"{metrics.get('tokens_per_s', 0):.0f}"}
        if "reward/mean" in metrics:
            self.rewards.append(metrics["reward/mean"])
            shown[f"reward({self.window})"] = f"{sum(self.rewards) / len(self.rewards):.3f}"
        if "eval/accuracy" in metrics:
            shown["acc"] = f"{metrics['eval/accuracy']:.3f}"
        self.bar.set_postfix(shown, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
