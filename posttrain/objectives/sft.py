"""SFT: negative log-likelihood of the demonstration tokens.

    L = -(1/N) sum_{i,t} m_{i,t} log pi(y*_{i,t} | s_{i,t})        (reference/objectives.md, section 1)

The (1/N) is the aggregation (`token_mean` by default); this file only gives the per-token term.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.experience import DEMO, Experience
from posttrain.objectives.base import ObjectiveConfig, register_objective, terms
from posttrain.policy import PolicyOutput


@dataclass(frozen=True)
class SFTConfig(ObjectiveConfig):
    """Supervised fine-tuning on demonstrations; no settings beyond the aggregation."""


@register_objective("sft", SFTConfig)
class SFT:
    source = "demos"
    needs = frozenset()

    def __init__(self, config: SFTConfig):
        self.config = config
        self.terms = terms(config.aggregation, DEMO)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, float]]:
        log_p = out.logprobs   # [B, L] log pi(y*_t | s_t)
        loss = -log_p          # [B, L] per-token NLL
        return loss, {}
