"""One forward pass of a causal LM over an Experience, returning what objectives read."""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.experience import Experience
from posttrain.ops.logprobs import selective_log_softmax


@dataclass
class PolicyOutput:
    logits: Tensor    # [B, L, V] logits at each position for the token it predicts, divided by the temperature
                      # (model dtype; only positions 0..T-2 are projected)
    logprobs: Tensor | None  # [B, L] float32 log pi_T(target_t | s_t) = log softmax(z / T)[target_t]
    values: Tensor | None = None  # [B, L] float32 V(s_t), when the model has a value head (rl/value_head.py; PPO)


def forward(model: torch.nn.Module, exp: Experience, temperature: float = 1.0, logprobs: bool = True) -> PolicyOutput:
    """Teacher-forced pass. `temperature` T scales the logits, z / T, so that RL objectives score the sampled tokens
    under the distribution they were drawn from (the rollout's sampling temperature; T = 1 for demonstrations).

    The LM head projects positions 0..T-2 only (`logits_to_keep`, when the model takes it): the last position
    predicts nothing, and slicing [B, T, V] logits afterwards would cost a second [B, T, V] buffer in backward.
    `logprobs=False` skips the target log-probabilities (a reference model whose logits are all that is read)."""
    length = exp.input_ids.shape[1] - 1                                  # L = T - 1
    kwargs = {"logits_to_keep": torch.arange(length, device=exp.input_ids.device)} if _keeps_logits(model) else {}
    out = model(input_ids=exp.input_ids, attention_mask=exp.attention_mask, use_cache=False, **kwargs)
    logits = out.logits if out.logits.shape[1] == length else out.logits[:, :length]   # [B, L, V]
    if temperature != 1.0:
        logits = logits / temperature                         # z / T
    values = out.get("values") if hasattr(out, "get") else getattr(out, "values", None)  # [B, T or L] value head
    values = values[:, :length] if isinstance(values, torch.Tensor) else None  # (ModelOutput.values is the dict method)
    return PolicyOutput(logits=logits, logprobs=selective_log_softmax(logits, exp.targets) if logprobs else None,
                        values=values)


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Whether the (unwrapped) model's forward takes transformers' `logits_to_keep`."""
    while hasattr(model, "module"):                            # DDP, DeepSpeed engine
        model = model.module
    return _forward_takes_logits_to_keep(type(getattr(model, "model", model)) if hasattr(model, "value_head")
                                         else type(model))


@functools.cache
def _forward_takes_logits_to_keep(cls: type) -> bool:
    return "logits_to_keep" in inspect.signature(cls.forward).parameters
