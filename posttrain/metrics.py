"""Metrics: one JSON object per logged step in RUN_DIR/metrics.jsonl, the accelerate trackers, a progress bar."""
from __future__ import annotations

import json
import math
import sys
import time
from collections import deque
from pathlib import Path

from tqdm.auto import tqdm

from posttrain.configlib import to_dict


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

    def start_over(self) -> None:
        """Forget every row: the run starts from the beginning (`--resume auto` before its first checkpoint)."""
        if self.accelerator.is_main_process:
            self.path.unlink(missing_ok=True)

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


def init_trackers(accelerator, recipe) -> None:
    """Start the recipe's trackers (logging.report_to) with the whole resolved recipe as the run's config, flattened
    to the dotted keys an override would use (`stages.0.optim.lr`), since trackers take scalar values only. W&B
    writes its files under the run directory (RUN_DIR/wandb), not the current directory."""
    if not recipe.logging.report_to:
        return
    init_kwargs = {"wandb": {"dir": str(recipe.output_dir)}} if "wandb" in recipe.logging.report_to else {}
    accelerator.init_trackers(recipe.logging.project, config=flat_config(to_dict(recipe)), init_kwargs=init_kwargs)


def flat_config(value, prefix: str = "") -> dict:
    """Nested config data as {dotted.key: scalar}; empty lists and mappings stay visible as '[]' / '{}'.

    >>> flat_config({"optim": {"lr": 0.1, "betas": [0.9, 0.95]}, "stages": [{"name": "sft"}], "rewards": []})
    {'optim.lr': 0.1, 'optim.betas.0': 0.9, 'optim.betas.1': 0.95, 'stages.0.name': 'sft', 'rewards': '[]'}
    """
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, (list, tuple)) else None
    if items is None:
        return {prefix: value}
    out: dict = {}
    for k, v in items:
        out |= flat_config(v, f"{prefix}.{k}" if prefix else str(k))
    if not out and prefix:
        out[prefix] = "{}" if isinstance(value, dict) else "[]"
    return out


def _plain(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep them visible
    return v


class Progress:
    """A stage's progress on the main process: step, loss, tokens/s, held-out accuracy when evaluated, ETA and, in RL
    stages, `reward(10)`: the mean reward of the last 10 steps (one step's mean over a few prompts is too noisy to
    read a trend from).

    On a terminal it is a tqdm bar. When the stream is not a terminal (CI, SLURM, `> log`), a redrawn bar would
    flood the log, so it prints one plain line every `interval` seconds instead, and a last one at `close`:
        sft: step 120/300 loss 0.4123 tok/s 5123 acc 0.140 elapsed 01:02 eta 01:33
    """

    window = 10

    def __init__(self, enabled: bool, total: int, initial: int, desc: str, file=None, interval: float = 30.0):
        self.file = sys.stderr if file is None else file          # tqdm's stream
        self.enabled, self.total, self.desc, self.interval = enabled, total, desc, interval
        self.tty = enabled and _isatty(self.file)
        self.rewards: deque[float] = deque(maxlen=self.window)
        self.fields: dict[str, str] = {}
        self.step = self.initial = self.printed = initial
        self.started = self.last_line = time.monotonic()
        self.bar = tqdm(total=total, initial=initial, desc=desc, disable=not self.tty, dynamic_ncols=True,
                        file=self.file, bar_format="{desc}: {n_fmt}/{total_fmt} [{elapsed}<{remaining}] {postfix}")

    def update(self, metrics: dict) -> None:
        self.fields = {"loss": f"{metrics.get('loss', float('nan')):.4f}",
                       "tok/s": f"{metrics.get('tokens_per_s', 0):.0f}"}
        if "reward/mean" in metrics:
            self.rewards.append(metrics["reward/mean"])
            self.fields[f"reward({self.window})"] = f"{sum(self.rewards) / len(self.rewards):.3f}"
        if "eval/accuracy" in metrics:
            self.fields["acc"] = f"{metrics['eval/accuracy']:.3f}"
        self.step += 1
        if self.tty:
            self.bar.set_postfix(self.fields, refresh=False)
            self.bar.update(1)
        elif self.enabled and time.monotonic() - self.last_line >= self.interval:
            self._print_line()

    def line(self) -> str:
        """The plain progress line of the current step."""
        elapsed = time.monotonic() - self.started
        done = self.step - self.initial
        eta = tqdm.format_interval(elapsed / done * (self.total - self.step)) if done else "?"
        shown = " ".join(f"{k} {v}" for k, v in self.fields.items())
        return (f"{self.desc}: step {self.step}/{self.total} {shown} elapsed {tqdm.format_interval(elapsed)} "
                f"eta {eta}")

    def _print_line(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self.last_line, self.printed = time.monotonic(), self.step

    def close(self) -> None:
        if self.tty:
            self.bar.close()
        elif self.enabled and self.step != self.printed:
            self._print_line()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):          # no isatty, or a closed stream
        return False
