"""Detached statistics of a per-token quantity over a micro-batch's loss tokens, for metrics (no device sync).

The trainer weights each micro-batch's mean by its share of the step's tokens, so their sum is the global mean.
(Loss aggregations are objectives/aggregation.py, never these.)
"""
from __future__ import annotations

import torch
from torch import Tensor


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x m) / sum(m) over this micro-batch, detached.   [B, L], [B, L] -> []"""
    return (x.detach().float() * mask).sum() / mask.sum().clamp(min=1.0)


def masked_stats(name: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """min / mean / max of x [B, L] over the loss tokens, as name/min, name/mean, name/max."""
    x, on = x.detach().float(), mask > 0
    return {f"{name}/min": torch.where(on, x, torch.inf).amin(), f"{name}/mean": masked_mean(x, mask),
            f"{name}/max": torch.where(on, x, -torch.inf).amax()}
