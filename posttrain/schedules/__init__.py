"""Schedules: a value that changes with the stage step (CHORD's mu, Prefix-RFT's prefix-ratio bounds and entropy-mask
ratio, UFT's hint probability). One typed config, one small file per shape, registered by name:

    value(s) = start * s / W                                    s < W          (linear warm-up from 0; W = warmup_steps)
             = shape(start, end, min(s - W, D) / D)              W <= s <= W + D (D = steps)
             = after  (or end when after is null)                s > W + D

    constant   shape = start                                     (schedules/constant.py)
    linear     shape = start + (end - start) x                   (schedules/linear.py)
    cosine     shape = end + (start - end) (1 + cos(pi x)) / 2   (schedules/cosine.py)

s is the stage step, counted from 0. In a recipe a plain number is a constant schedule: `mu: 0.1` is
`mu: {name: constant, start: 0.1}`.
"""
from posttrain.schedules import constant, cosine, linear  # noqa: F401  (register the shapes)
from posttrain.schedules.base import SCHEDULES, Schedule, schedule_value

__all__ = ["SCHEDULES", "Schedule", "schedule_value"]
