"""Metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, the accelerate trackers, a progress bar."""
from __future__ import annotations

import json
import math
import time
from collections import deque
from pathlib import Path

from tqdm.auto import tqdm


class MetricsLog:
    """Appends to metrics.jsonl (main process only) and forwards to accelerate's trackers.

    Rows: a stage's header row first (`stage_header`: stage, world_size, data counts; at the global step the stage
    starts from), then one row per logged step. Every row has `step` (the global step) and `stage`. A resumed run
    first drops what was logged after its checkpoint (`drop_after`), so the file holds each row once: what an
    uninterrupted run would have written.
    """

    def __init__(self, accelerator, run_dir: Path):
        self.accelerator = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"

    def log(self, metrics: dict, step: int) -> None:
        row = {"step": step, **{k: _plain(v) for k, v in metrics.items()}, "time": round(time.time(), 3)}
        if self.accelerator.is_main_process:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
        self.accelerator.log({k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}, step=step)

    def stage_header(self, stage: int, metrics: dict, step: int) -> None:
        """The stage's header row (stage, world_size, `metrics`), unless the file has it already (a resumed stage)."""
        main = self.accelerator.is_main_process
        if main and any(_is_header(row) and row.get("stage") == stage for row in _rows(self.path)):
            return
        self.log({"stage": stage, "world_size": self.accelerator.num_processes, **metrics}, step)

    def drop_after(self, global_step: int, stage: int) -> None:
        """Resume from a checkpoint taken at `global_step` in `stage`: forget the rows logged after it (steps past
        it; header rows of later stages, which start at its step; a line cut short by a kill)."""
        if not self.accelerator.is_main_process or not self.path.is_file():
            return
        kept = [row for row in _rows(self.path) if row["step"] < global_step or (row["step"] == global_step and
                                                                                 row.get("stage", 0) <= stage)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept))
        tmp.replace(self.path)


def _is_header(row: dict) -> bool:
    return "world_size" in row


def _rows(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a line that does not parse (cut short by a kill mid-write) is skipped."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


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
