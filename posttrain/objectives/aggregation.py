"""Named loss aggregations, kept apart from the per-token losses (docs/provenance.md, Aggregations).

An optimizer step sees many micro-batches on many processes. `Normalizer` holds the *global* counts of the step,
so that `aggregate` of each micro-batch sums, over all micro-batches and processes, to exactly the aggregate of
the whole batch: gradient accumulation and data parallelism do not change the loss.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.registry import Registry

AGGREGATIONS: Registry = Registry("aggregation")


@dataclass(frozen=True)
class Normalizer:
    tokens: float   # loss-carrying tokens in the whole step (all micro-batches, all processes)
    seqs: float     # sequences with at least one loss-carrying token in the whole step
    max_len: float  # L_max for seq_mean_token_sum_norm (a constant: e.g. the generation budget)

    @staticmethod
    def of(mask: Tensor, max_len: float | None = None) -> "Normalizer":
        """The normalizer of a single batch (no accumulation): mask [B, L]."""
        lengths = mask.sum(-1)
        return Normalizer(float(mask.sum()), float((lengths > 0).sum()), float(max_len or mask.shape[-1]))


@AGGREGATIONS.register("token_mean")
def token_mean(loss: Tensor, mask: Tensor, norm: Normalizer) -> Tensor:
    """sum_{i,t} l*m / sum_{i,t} m  (DAPO; SFT)."""
    return (loss * mask).sum() / max(norm.tokens, 1.0)


@AGGREGATIONS.register("seq_mean_token_mean")
def seq_mean_token_mean(loss: Tensor, mask: Tensor, norm: Normalizer) -> Tensor:
    """(1/B) sum_i [ sum_t l*m / |o_i| ]  (original GRPO)."""
    per_seq = (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)  # [B]
    return per_seq.sum() / max(norm.seqs, 1.0)


@AGGREGATIONS.register("seq_mean_token_sum_norm")
def seq_mean_token_sum_norm(loss: Tensor, mask: Tensor, norm: Normalizer) -> Tensor:
    """sum_{i,t} l*m / (B * L_max), L_max a constant  (Dr. GRPO)."""
    return (loss * mask).sum() / max(norm.seqs * norm.max_len, 1.0)


def aggregate(loss: Tensor, mask: Tensor, mode: str, norm: Normalizer | None = None) -> Tensor:
    """Aggregate a per-token loss [B, L] under mask [B, L] by the named mode -> scalar."""
    return AGGREGATIONS.get(mode)(loss, mask, norm or Normalizer.of(mask))
