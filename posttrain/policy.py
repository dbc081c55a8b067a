"""One forward pass of a causal LM over an Experience, returning what objectives read."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.experience import Experience
from posttrain.ops.logprobs import selective_log_softmax


@dataclass
class PolicyOutput:
    logits: Tensor    # [B, L, V] logits at each position for the token it predicts (model dtype, a view)
    logprobs: Tensor  # [B, L] float32 log pi(target_t | s_t)
    values: Tensor | None = None  # [B, L] float32 V(s_t), when the model has a value head (rl/value_head.py; PPO)


def forward(model: torch.nn.Module, exp: Experience) -> PolicyOutput:
    out = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, use_cache=False)
    logits = out.logits[:, :-1]                               # [B, L, V]
    values = out.get("values") if hasattr(out, "get") else getattr(out, "values", None)  # [B, T] value head, else None
    values = values if isinstance(values, torch.Tensor) else None  # (ModelOutput.values is the dict method)
    return PolicyOutput(logits=logits, logprobs=selective_log_softmax(logits, exp.targets),
                        values=values[:, :-1] if values is not None else None)
