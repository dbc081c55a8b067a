"""The policy-gradient objectives' metrics: clip fractions, the ratio, the surrogate loss, the entropy (token means
over the loss tokens, ops/masked.py)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from posttrain.ops.masked import masked_mean

if TYPE_CHECKING:
    from posttrain.rl.surrogate import Surrogate


def policy_metrics(pg: Surrogate, ratio: Tensor, entropy: Tensor | None, mask: Tensor) -> dict[str, Tensor]:
    """Clip fractions (low / high / dual), mean ratio and surrogate loss, and the mean policy entropy if given ([B, L],
    PolicyOutput.entropy)."""
    m = {"clip_ratio/low": masked_mean(pg.clipped_low, mask), "clip_ratio/high": masked_mean(pg.clipped_high, mask),
         "clip_ratio/dual": masked_mean(pg.clipped_dual, mask), "ratio/mean": masked_mean(ratio, mask),
         "pg_loss": masked_mean(pg.loss, mask)}
    if entropy is not None:
        m["entropy"] = masked_mean(entropy, mask)
    return m
