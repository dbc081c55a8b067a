"""DAPO dynamic sampling (arXiv 2503.14476, Sec. 3.2): keep only groups whose rewards are not all equal, and sample
more prompts until the batch holds enough of them.

A group whose G rewards are identical has A_i = 0 for every sample under any group-baseline estimator, so it adds
no gradient, only noise to the normaliser; DAPO's constraint is 0 < |{o_i correct}| < G.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor


def informative(group: Tensor, rewards: Tensor) -> Tensor:
    """[B] bool: True for the samples of groups whose rewards are not all equal (max_G R > min_G R).   [B], [B]"""
    _, inverse = torch.unique(group, return_inverse=True)                   # [B] dense group index
    k = int(inverse.max()) + 1 if inverse.numel() else 0
    r = rewards.to(torch.float64)
    hi = torch.full((k,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inverse, r, "amax")
    lo = torch.full((k,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inverse, r, "amin")
    return (hi > lo)[inverse]


def first_groups(group: Tensor, keep: Tensor, limit: int) -> Tensor:
    """Row indices of the samples of the first `limit` kept groups, in order of first appearance.   -> [N] long"""
    _, inverse = torch.unique(group, return_inverse=True)
    rows = torch.arange(len(group), device=group.device)
    first = torch.full((int(inverse.max()) + 1 if len(group) else 0,), len(group), device=group.device)
    first = first.scatter_reduce(0, inverse, rows, "amin")                  # [K] first row of each group
    kept_groups = torch.unique(inverse[keep])                               # dense ids of kept groups
    chosen = kept_groups[first[kept_groups].argsort()[:limit]]               # first `limit` by appearance
    return rows[keep & torch.isin(inverse, chosen)]


@dataclass
class DynamicSampling:
    batches: list = field(default_factory=list)   # kept rows of each round (`batch.select(rows)`), in order
    groups: int = 0                               # informative groups kept (== target when `full`)
    dropped_groups: int = 0                       # groups dropped for zero reward variance
    surplus_groups: int = 0                       # informative groups sampled beyond the target (discarded)
    rounds: int = 0                               # calls to sample_more
    full: bool = False                            # the target was reached within max_rounds


def fill_batch(sample_more: Callable[[], Any], target_groups: int, max_rounds: int) -> DynamicSampling:
    """Call `sample_more()` until `target_groups` informative groups are kept or `max_rounds` calls are made.

    `sample_more()` returns a batch with `.group` [B], `.rewards` [B] and `.select(rows)` (an Experience does);
    group ids only need to be unique within one call. Zero-variance groups are dropped; of the last round only
    the groups needed to fill the batch are kept (in order of appearance). With `full` False the caller decides
    (train on a short batch, or raise).
    """
    if target_groups < 1 or max_rounds < 1:
        raise ValueError(f"target_groups and max_rounds must be >= 1, got {target_groups}, {max_rounds}")
    out = DynamicSampling()
    while out.groups < target_groups and out.rounds < max_rounds:
        batch = sample_more()
        out.rounds += 1
        keep = informative(batch.group, batch.rewards)                       # [B]
        n_groups = len(torch.unique(batch.group))
        n_kept = len(torch.unique(batch.group[keep]))
        out.dropped_groups += n_groups - n_kept
        take = min(n_kept, target_groups - out.groups)
        out.surplus_groups += n_kept - take
        if take > 0:
            out.batches.append(batch.select(first_groups(batch.group, keep, take)))
            out.groups += take
    out.full = out.groups >= target_groups
    return out
