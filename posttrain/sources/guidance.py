"""Demonstrations inside rollouts: what a rollout objective may ask the rollout builder to put in a prompt's group.

    demos_in_group   LUFFY (arXiv 2504.14945): the row's full demonstration (+ EOS) as one more member of the group,
                     scored by the same rewards; its tokens have provenance DEMO.
    PrefixSampling   Prefix-RFT (arXiv 2507.01679): `prefixed` of the G rollouts of a prompt continue a prefix of the
                     demonstration; the prefix ratio l ~ U[low(s), high(s)], the prefix is int(l |y*|) tokens, at least
                     `min_tokens`, at most |y*| - 1 (never the whole demonstration); prefix tokens are part of the
                     response (PREFIX provenance), the continuation is POLICY. The lowest-entropy fraction rho(s) of
                     the batch's prefix tokens get advantage 0.
    HintSampling     UFT (arXiv 2505.16984): every rollout of a prompt continues the same hint, the first
                     separation[k] steps of the solution, k ~ Binomial(num, p(s)), num = min(max_splits, #steps),
                     separation[j] = round(j #steps / num); p(s) anneals to 0. The hint sits after the prompt, as the
                     authors' code appends it to the prompt tokens: by default it is not part of the response the
                     rewards read.

Every draw is a function of (the stage's seed, the prompt's global position, the slot): no RNG state to checkpoint,
and the same for any number of processes. Schedules take the stage step s.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.schedules import Schedule, schedule_value


@dataclass(frozen=True)
class PrefixSampling:
    """Prefix-RFT's prefixed rollouts."""

    prefixed: int              # rollouts per prompt (of the G) that continue a demonstration prefix
    low: Schedule | float      # lower bound of the prefix ratio at step s
    high: Schedule | float     # upper bound of the prefix ratio at step s
    min_tokens: int            # shortest prefix
    entropy_mask: Schedule | float   # rho(s): fraction of the batch's prefix tokens (lowest entropy) given A = 0

    def bounds(self, step: int) -> tuple[float, float]:
        """(lo, hi) at stage step `step`, swapped when lo > hi (as the authors' sampler does)."""
        lo, hi = schedule_value(self.low, step), schedule_value(self.high, step)
        return (hi, lo) if lo > hi else (lo, hi)


@dataclass(frozen=True)
class HintSampling:
    """UFT's annealed solution hints."""

    probability: Schedule | float   # p(s): chance each of the `num` split points is passed
    max_splits: int                 # num = min(max_splits, #steps)
    in_response: bool               # the rewards read hint + continuation (False: the continuation alone, as UFT)


def prefix_length(ratio: float, demo_tokens: int, min_tokens: int) -> int:
    """int(ratio |y*|), raised to `min_tokens`, capped at |y*| - 1 (the last demonstration token is always left to
    the policy); |y*| counts the demonstration's tokens without its end-of-turn.

    >>> prefix_length(0.5, 10, 1), prefix_length(0.01, 10, 3), prefix_length(1.0, 10, 1), prefix_length(0.9, 1, 1)
    (5, 3, 9, 0)
    """
    return max(0, min(max(int(ratio * demo_tokens), min_tokens), demo_tokens - 1))


def draw_ratio(lo: float, hi: float, rng: random.Random) -> float:
    """l = lo + (hi - lo) u, u ~ U[0, 1] (the authors' Beta(1, 1))."""
    return lo + (hi - lo) * rng.random()


def solution_steps(solution: str) -> list[str]:
    """The solution's lines, each with its newline (so joining a prefix of them is a prefix of the text).

    >>> solution_steps("1+2=3\\n3-1=2\\n#### 2")
    ['1+2=3\\n', '3-1=2\\n', '#### 2']
    """
    return solution.splitlines(keepends=True)


def hint_splits(num_steps: int, max_splits: int) -> list[int]:
    """separation[j] = round(j num_steps / num), j = 0..num, num = min(max_splits, num_steps); the last is num_steps.

    >>> hint_splits(3, 5), hint_splits(10, 5), hint_splits(0, 5)
    ([0, 1, 2, 3], [0, 2, 4, 6, 8, 10], [0])
    """
    num = min(max_splits, num_steps)
    if num == 0:
        return [0]
    splits = [round(j / num * num_steps) for j in range(num + 1)]
    splits[-1] = num_steps
    return splits


def draw_hint(steps: list[str], probability: float, max_splits: int, rng: random.Random) -> str:
    """The first separation[k] steps, k ~ Binomial(num, p): the number of passed split points."""
    splits = hint_splits(len(steps), max_splits)
    if probability <= 0.0:
        return ""
    k = sum(rng.random() < probability for _ in range(len(splits) - 1))
    return "".join(steps[: splits[k]])


def lowest_fraction(values: Tensor, rho: float) -> Tensor:
    """[N] bool marking the floor(rho N) smallest values (ties in order of position: a stable sort).

    >>> lowest_fraction(torch.tensor([0.3, 0.1, 0.2, 0.1]), 0.5).tolist()
    [False, True, False, True]
    """
    k = int(rho * values.numel())
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[torch.sort(values.detach().cpu().double(), stable=True).indices[:k]] = True
    return chosen
