"""The Experience batch every objective consumes, whatever built it (demonstrations, rollouts, prefixes).

Token tensors are [B, T] over the whole sequence (prompt + completion, right padded). Per-token quantities that
belong to a *prediction* (log-probabilities, advantages, losses) are [B, L] with L = T - 1: position j predicts
token j + 1. `targets` and `target_mask` give the matching [B, L] views.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

# Provenance of each token (Experience.source).
PROMPT, DEMO, PREFIX, POLICY = 0, 1, 2, 3


@dataclass
class Experience:
    input_ids: Tensor                   # [B, T] prompt + completion token ids
    attention_mask: Tensor              # [B, T] 1 for real tokens, 0 for padding
    loss_mask: Tensor                   # [B, T] 1 on tokens that carry loss (never prompt, never padding)
    source: Tensor                      # [B, T] PROMPT / DEMO / PREFIX / POLICY
    group: Tensor | None = None         # [B] group id for advantages
    old_logprobs: Tensor | None = None  # [B, L] sampling policy's log-probs of the targets
    ref_logprobs: Tensor | None = None  # [B, L] frozen reference's log-probs of the targets
    sampler_logprobs: Tensor | None = None  # [B, L] the rollout engine's own log-probs (e.g. vLLM), for truncated IS
    advantages: Tensor | None = None    # [B, L]
    values: Tensor | None = None        # [B, L] (PPO)
    returns: Tensor | None = None       # [B, L] (PPO)
    rewards: Tensor | None = None       # [B]
    ref_logits: Tensor | None = None    # [B, L, V] reference logits, only for objectives that need full-vocab terms
    columns: list[dict[str, Any]] = field(default_factory=list)  # per-sample raw columns (gold answers ...)

    @property
    def targets(self) -> Tensor:        # [B, L] the token each position predicts
        return self.input_ids[:, 1:]

    @property
    def target_mask(self) -> Tensor:    # [B, L] float mask of predicted tokens that carry loss
        return self.loss_mask[:, 1:].to(torch.float32)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def to(self, device: torch.device | str) -> "Experience":
        moved = {f.name: (v.to(device) if isinstance(v := getattr(self, f.name), Tensor) else v)
                 for f in dataclasses.fields(self)}
        return Experience(**moved)

    def select(self, index: slice | Tensor | list[int]) -> "Experience":
        """Rows `index` of every per-sample field (tensors and columns)."""
        idx = index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                out[f.name] = v[idx]
            elif f.name == "columns":
                out[f.name] = v[index] if isinstance(index, slice) else [v[int(i)] for i in idx]
            else:
                out[f.name] = v
        return Experience(**out)

    def split(self, size: int) -> list["Experience"]:
        """Consecutive micro-batches of at most `size` rows."""
        return [self.select(slice(i, i + size)) for i in range(0, len(self), size)]

    def trimmed(self) -> "Experience":
        """Drop trailing columns that are padding in every row (saves compute on short micro-batches)."""
        t = int(self.attention_mask.sum(-1).max().item())
        t = max(t, 2)
        if t >= self.input_ids.shape[1]:
            return self
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            token_level = f.name in ("input_ids", "attention_mask", "loss_mask", "source")
            if isinstance(v, Tensor) and v.dim() >= 2 and token_level:
                out[f.name] = v[:, :t]
            elif isinstance(v, Tensor) and v.dim() >= 2:
                out[f.name] = v[:, : t - 1]
            else:
                out[f.name] = v
        return Experience(**out)


@dataclass
class GroupOutcome:
    """One rollout group of a step: the data row its prompt came from and the rewards of its sampled rows."""

    row: int
    rewards: list[float]


def pad_right(rows: list[list[int]], value: int, length: int | None = None) -> Tensor:
    """[B, T] LongTensor from ragged rows, right padded with `value`."""
    length = length or max(len(r) for r in rows)
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out
