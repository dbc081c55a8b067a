"""The schedule config and the warm-up / hold logic every shape shares (the shapes are one file each)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from posttrain.configlib import field_doc, require
from posttrain.registry import Registry

# name -> shape(start, end, x) with x in [0, 1] the fraction of the decay done
SCHEDULES: Registry[Callable[[float, float, float], float]] = Registry("schedule")


@dataclass(frozen=True)
class Schedule:
    """A value over the stage's steps: warm-up from 0, then a shape from `start` to `end` over `steps`, then hold."""

    name: str = field_doc("constant", "shape: constant, linear or cosine")
    start: float = field_doc(0.0, "the value (constant), or the value after the warm-up where the decay begins")
    end: float = field_doc(0.0, "linear / cosine: the value reached after `steps` decay steps")
    steps: int = field_doc(0, "linear / cosine: length D of the decay in stage steps (0 = `end` at once)")
    warmup_steps: int = field_doc(0, "W: rise linearly from 0 to `start` over the first W steps (0 = none)")
    after: float | None = field_doc(None, "value after the decay, from step W + D + 1 on (null = stay at `end`)")

    def check(self) -> None:
        require(self.name in SCHEDULES, "name", f"unknown schedule {self.name!r}; registered: "
                                                f"{', '.join(SCHEDULES.names())}")
        require(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")

    @staticmethod
    def constant(value: float) -> "Schedule":
        return Schedule("constant", float(value))

    def bounds(self) -> tuple[float, float]:
        """The smallest and largest value the schedule takes."""
        values = [0.0] if self.warmup_steps else []
        values += [self.start] + ([] if self.name == "constant" else [self.end])
        values += [] if self.after is None else [self.after]
        return min(values), max(values)


def schedule_value(s: Schedule | float, step: int) -> float:
    """The value of schedule `s` at stage step `step` (>= 0); a plain number is a constant."""
    if not isinstance(s, Schedule):
        return float(s)
    if step < s.warmup_steps:
        return s.start * step / s.warmup_steps                               # start * s / W
    done = step - s.warmup_steps                                             # s - W
    if s.after is not None and s.name != "constant" and done > s.steps:
        return s.after
    x = 1.0 if s.steps == 0 else min(done, s.steps) / s.steps                # min(s - W, D) / D
    return SCHEDULES.get(s.name)(s.start, s.end, x)
