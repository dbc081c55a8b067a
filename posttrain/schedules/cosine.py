"""cosine: half a cosine from `start` down (or up) to `end` over the decay steps.

    value = end + (start - end) (1 + cos(pi x)) / 2,   x = (s - W) / D in [0, 1]

CHORD's mu (arXiv 2508.11408; Trinity-RFT mix_chord: warm-up W to mu_peak, cosine to mu_valley over D), Prefix-RFT's
cosine_decay controller (prefix_rft scheduler/global_step.py) and UFT's hint probability
p(t) = 0.05 + 0.45 (1 + cos(pi t / T_hint)) (liumy2010/UFT verl/utils/dataset/rl_dataset.py: start 0.95, end 0.05,
D = T_hint, after 0) are all this shape.
"""
import math

from posttrain.schedules.base import SCHEDULES


@SCHEDULES.register("cosine")
def cosine(start: float, end: float, x: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * x))
