"""constant: the value is `start` at every step (after an optional warm-up)."""
from posttrain.schedules.base import SCHEDULES


@SCHEDULES.register("constant")
def constant(start: float, end: float, x: float) -> float:
    return start
