"""Detached per-micro-batch statistics the policy-gradient objectives log (token means over the loss tokens, as the
trainer expects: it weights each micro-batch's value by its share of the step's tokens). No device sync."""
from __future__ import annotations

import torch
from torch import Tensor

from posttrain.rl.surrogate import Surrogate


def token_mean(x: Tensor, mask: Tensor) -> Tensor:
    """sum(x m) / sum(m) over this micro-batch, detached.   [B, L], [B, L] -> []"""
    return (x.detach().float() * mask).sum() / mask.sum().clamp(min=1.0)


def masked_stats(name: str, x: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """min / mean / max of x [B, L] over the loss tokens."""
    x, on = x.detach().float(), mask > 0
    return {f"{name}/min": torch.where(on, x, torch.inf).amin(), f"{name}/mean": token_mean(x, mask),
            f"{name}/max": torch.where(on, x, -torch.inf).amax()}


def policy_metrics(pg: Surrogate, ratio: Tensor, entropy: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
    """Clip fractions (low / high / dual), mean ratio and surrogate loss, and the mean policy entropy if given ([B, L],
    PolicyOutput.entropy)."""
    m = {"clip_ratio/low": token_mean(pg.clipped_low, mask), "clip_ratio/high": token_mean(pg.clipped_high, mask),
         "clip_ratio/dual": token_mean(pg.clipped_dual, mask), "ratio/mean": token_mean(ratio, mask),
         "pg_loss": token_mean(pg.loss, mask)}
    if entropy is not None:
        m["entropy"] = token_mean(entropy, mask)
    return m
