"""linear: from `start` to `end` in a straight line over the decay steps."""
from posttrain.schedules.base import SCHEDULES


@SCHEDULES.register("linear")
def linear(start: float, end: float, x: float) -> float:
    return start + (end - start) * x                                         # start + (end - start) x
