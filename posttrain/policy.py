"""One forward pass of a causal LM over an Experience, returning what objectives read."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.experience import Experience
from posttrain.ops.logprobs import selective_log_softmax


@dataclass
class PolicyOutput:
    logits: Tensor    # [B, L, V] logits at each position for the token it predicts, divided by the temperature
                      # (model dtype; a view when the temperature is 1)
    logprobs: Tensor  # [B, L] float32 log pi_T(target_t | s_t) = log softmax(z / T)[target_t]
    values: Tensor | None = None  # [B, L] float32 V(s_t), when the model has a value head (rl/value_head.py; PPO)


def forward(model: torch.nn.Module, exp: Experience, temperature: float = 1.0) -> PolicyOutput:
    """Teacher-forced pass. `temperature` T scales the logits, z / T, so that RL objectives score the sampled tokens
    under the distribution they were drawn from (the rollout's sampling temperature; T = 1 for demonstrations)."""
    out = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, use_cache=False)
    logits = out.logits[:, :-1]                               # [B, L, V]
    if temperature != 1.0:
        logits = logits / temperature                         # z / T
    values = out.get("values") if hasattr(out, "get") else getattr(out, "values", None)  # [B, T] value head, else None
    values = values if isinstance(values, torch.Tensor) else None  # (ModelOutput.values is the dict method)
    return PolicyOutput(logits=logits, logprobs=selective_log_softmax(logits, exp.targets),
                        values=values[:, :-1] if values is not None else None)
