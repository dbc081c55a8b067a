"""SRFT — supervised reinforcement fine-tuning in one stage (Fu et al., arXiv 2506.19767), per token:

    L = L_SFT^demo + L_RL^demo + L_RL^self - c_H token_mean(H)

    L_SFT^demo   w_SFT(t) * -log pi(y*_t | s_t) on the demonstration's tokens, token mean,
                 w_SFT = 0.5 sg(exp(-H_t))  (the paper; `sft_entropy_sign: positive` gives exp(+H_t), which the
                 released code reportedly uses: a secondary report, not checked against the code)
    L_RL^demo    -A f(pi(y*_t)), f(p) = p / (p + 0.1): the demonstration as a member of its group, LUFFY-style
    L_RL^self    w_RL(t) * -A r_t on the sampled tokens, w_RL = 0.1 sg(exp(H_t)) where A > 0, 1 where A <= 0
    H_t          the policy's entropy at the token's position (detached in the weights)

The RL terms are LUFFY's (objectives/luffy.py: advantages R - mean over the group including the demonstration, no
std, no clip, Dr. GRPO's normaliser); SRFT is reported to build on LUFFY's code. Sources (docs/provenance.md): the
paper's equations through secondary summaries ([2nd]); the authors' repository (fyqqyf/SRFT) could not be fetched,
so every coefficient is UNVERIFIED against the code: 0.5, 0.1, the entropy bonus 0.001, lr 1e-6, 8 rollouts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import DEMO, POLICY, Experience
from posttrain.objectives.base import Term, register_objective, terms
from posttrain.objectives.grpo import grpo_plan
from posttrain.objectives.luffy import LUFFYConfig, mixed_policy_loss
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput
from posttrain.rl.metrics import policy_metrics
from posttrain.rl.surrogate import advantages
from posttrain.sources.plan import RolloutPlan


@dataclass(frozen=True)
class SRFTConfig(LUFFYConfig):
    """SRFT: entropy-weighted SFT on the in-group demonstration + LUFFY's off-/on-policy RL (UNVERIFIED settings)."""

    sft_coef: float = field_doc(0.5, "the 0.5 of w_SFT = 0.5 sg(exp(-H))")
    sft_entropy_sign: Literal["negative", "positive"] = field_doc(
        "negative", "negative: w_SFT = 0.5 exp(-H), the paper; positive: exp(+H), reportedly the released code")
    rl_positive_coef: float = field_doc(0.1, "the 0.1 of w_RL = 0.1 sg(exp(H)) on positive-advantage sampled tokens")

    def check(self) -> None:
        super().check()
        require(self.sft_coef >= 0, "sft_coef", f"must be >= 0, got {self.sft_coef}")
        require(self.rl_positive_coef >= 0, "rl_positive_coef", f"must be >= 0, got {self.rl_positive_coef}")
        require(self.demos_in_group == 1, "demos_in_group", "SRFT's SFT term reads the demonstration in each group: 1")


def sft_weight(entropy: Tensor, coef: float, sign: str) -> Tensor:
    """w_SFT = coef exp(-+H), no gradient.   [B, L] -> [B, L]"""
    h = entropy.detach()
    return coef * torch.exp(-h if sign == "negative" else h)


def rl_weight(entropy: Tensor, adv: Tensor, coef: float) -> Tensor:
    """w_RL = coef exp(H) where A > 0, else 1; no gradient.   [B, L] -> [B, L]"""
    return torch.where(adv > 0, coef * torch.exp(entropy.detach()), torch.ones_like(adv))


@register_objective("srft", SRFTConfig)
class SRFT:
    source = "rollouts"

    def __init__(self, config: SRFTConfig):
        self.config = config
        self.needs = frozenset({"entropy"})                 # the weights read H; the bonus (c_H > 0) its gradient
        extra = {"entropy": Term(frozenset({DEMO, POLICY}), "token_mean")} if config.entropy_coef > 0 else {}
        self.terms = terms(config.aggregation, DEMO, POLICY, sft=Term(frozenset({DEMO}), "token_mean"), **extra)

    def rollout_plan(self) -> RolloutPlan:
        return grpo_plan(self.config, reference=False, demos_in_group=self.config.demos_in_group)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        c = self.config
        sampled = exp.target_mask * (exp.source[:, 1:] == POLICY)                    # [B, L]
        demo = exp.target_mask * (exp.source[:, 1:] == DEMO)                         # [B, L]
        entropy = out.entropy                                                        # [B, L] H_t (with grad)
        w_rl = rl_weight(entropy, advantages(exp), c.rl_positive_coef)               # [B, L] w_RL
        mixed = mixed_policy_loss(c, out, exp, weight=w_rl)                          # L_RL^demo + L_RL^self
        w_sft = sft_weight(entropy, c.sft_coef, c.sft_entropy_sign)                  # [B, L] w_SFT
        losses = {"loss": mixed.loss, "sft": -w_sft * out.logprobs}                  # ..., w_SFT * -log pi
        metrics = policy_metrics(mixed.surrogate, mixed.ratio, None, sampled) | mixed.metrics | {
            "entropy": masked_mean(entropy, sampled), "srft/sft_weight": masked_mean(w_sft, demo),
            "srft/rl_weight": masked_mean(w_rl, sampled)}
        if c.entropy_coef > 0:
            losses["entropy"] = -c.entropy_coef * entropy
        return losses, metrics
