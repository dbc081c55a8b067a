"""SFT: negative log-likelihood of the demonstration tokens.

    L = -(1/N) sum_{i,t} m_{i,t} log pi(y*_{i,t} | s_{i,t})  [ - c_H (1/N) sum_{i,t} m_{i,t} H(pi(.|s_{i,t})) ]

(docs/provenance.md, SFT). The (1/N) is the aggregation (`token_mean` by default); this file gives the per-token
term. The optional entropy bonus is ReLIFT's SFT loss (arXiv 2506.07527; the authors' code: token mean NLL - 0.001
H); `entropy_metric` logs the policy entropy of the demonstration tokens (AMFT's entropy target is measured on it).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import DEMO, Experience
from posttrain.objectives.base import ObjectiveConfig, Term, register_objective, terms
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput


@dataclass(frozen=True)
class SFTConfig(ObjectiveConfig):
    """Supervised fine-tuning on demonstrations."""

    entropy_coef: float = field_doc(0.0, "c_H of an entropy bonus -c_H token_mean(H) over the demonstration tokens "
                                         "(ReLIFT's SFT: 0.001; 0 = plain SFT)")
    entropy_metric: bool = field_doc(False, "log sft/entropy, the policy entropy over the demonstration tokens")

    def check(self) -> None:
        super().check()
        require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")


@register_objective("sft", SFTConfig)
class SFT:
    source = "demos"

    def __init__(self, config: SFTConfig):
        self.config = config
        self.needs = frozenset({"entropy"} if config.entropy_coef > 0 or config.entropy_metric else set())
        extra = {"entropy": Term(frozenset({DEMO}), "token_mean")} if config.entropy_coef > 0 else {}
        self.terms = terms(config.aggregation, DEMO, **extra)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor | dict[str, Tensor], dict]:
        log_p = out.logprobs   # [B, L] log pi(y*_t | s_t)
        loss = -log_p          # [B, L] per-token NLL
        metrics = {"entropy": masked_mean(out.entropy, exp.target_mask)} if out.entropy is not None else {}
        if self.config.entropy_coef == 0:
            return loss, metrics
        return {"loss": loss, "entropy": -self.config.entropy_coef * out.entropy}, metrics   # - c_H H, with grad
