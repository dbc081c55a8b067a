"""CHORD-phi (Zhang et al., arXiv 2508.11408): SFT on expert demonstrations with each token weighted by

    l_t = -sg( p_t (1 - p_t) ) log p_t,        p_t = pi(y*_t | s_t)

which down-weights tokens the policy already predicts with certainty (p ~ 1) and ones far from its distribution
(p ~ 0), so the expert data shapes the policy without overriding it. It is CHORD's SFT term; the mu that mixes it
with the RL term is the `chord` mixer's (mixers/chord.py; CHORD-phi: constant mu = 0.1). Followed: the authors'
code (modelscope/Trinity-RFT, trinity/algorithm/policy_loss_fn/chord_policy_loss.py at 0414330, through the search
index): the weight p (1 - p) is detached and the term is a token mean over the expert tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.experience import DEMO, Experience
from posttrain.objectives.base import ObjectiveConfig, register_objective, terms
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput


@dataclass(frozen=True)
class ChordPhiConfig(ObjectiveConfig):
    """CHORD's phi-weighted SFT on demonstrations; no settings beyond the aggregation."""


@register_objective("chord_phi", ChordPhiConfig)
class ChordPhi:
    source = "demos"
    needs = frozenset()

    def __init__(self, config: ChordPhiConfig):
        self.config = config
        self.terms = terms(config.aggregation, DEMO)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        log_p = out.logprobs                              # [B, L] log pi(y*_t | s_t)
        p = log_p.detach().exp()                          # [B, L] sg(p_t)
        phi = p * (1.0 - p)                               # [B, L] sg(p (1 - p))
        return -phi * log_p, {"phi": masked_mean(phi, exp.target_mask), "nll": masked_mean(-log_p, exp.target_mask)}
