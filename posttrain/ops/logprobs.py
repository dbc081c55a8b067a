"""Log-probabilities of target tokens without a full [B, T, V] float32 log-softmax copy."""
from __future__ import annotations

import torch
from torch import Tensor


def selective_log_softmax(logits: Tensor, targets: Tensor, chunk_tokens: int = 1024) -> Tensor:
    """log softmax(logits)[..., target] for every position, in float32.

    logits: [B, L, V] (any float dtype), targets: [B, L] -> [B, L] float32.
    Works over chunks of `chunk_tokens` positions so the float32 work buffer is at most [chunk_tokens, V].
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])        # [B*L, V] (a view)
    flat_targets = targets.reshape(-1)                         # [B*L]
    out = torch.empty(flat_targets.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, flat_targets.numel(), chunk_tokens):
        rows = flat_logits[start : start + chunk_tokens].float()                  # [C, V]
        picked = rows.gather(-1, flat_targets[start : start + chunk_tokens, None]).squeeze(-1)  # [C]
        out[start : start + chunk_tokens] = picked - torch.logsumexp(rows, dim=-1)
    return out.view(targets.shape)
