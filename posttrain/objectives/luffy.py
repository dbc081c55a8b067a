"""LUFFY — Learning to reason Under oFF-policY guidance (Yan et al., arXiv 2504.14945), per token of row i:

    l_{i,t} = -A_i f(pi(o_t | s_t)),      f(p) = p / (p + gamma)          o_t a demonstration token (DEMO): policy
                                                                           shaping, no ratio to pi_old, no clip
            = -A_i r_{i,t}                                                 o_t a sampled token (POLICY): the ratio
              (or -min(r A, clip(r) A) with clip_policy)                   unclipped, as the authors run it
    L = agg(l) - c_H token_mean(H(pi(. | s_t)))                            entropy bonus over all response tokens

    A_i = R_i - mean_G(R)       over the whole group: the G sampled rows *and* the demonstration row, which the same
                                rewards score (no division by the std)
    agg = sum_{i,t} l / (B L_max)   Dr. GRPO's constant normaliser (seq_mean_token_sum_norm)

The gradient of the shaped term is -A gamma p / (p + gamma)^2 grad log p: it vanishes for demonstration tokens the
policy already finds likely (p >> gamma) and for ones it finds very unlikely, and is largest near p = gamma.

Followed: the authors' code (ElliottYan/LUFFY@01f4ae0, luffy/verl/verl/mix_src/; docs/provenance.md) where
the paper is silent or differs: one full demonstration + EOS per group (n_prefix = 1, ratio 1); `grpo` advantages
with grpo_use_std = False over all 8 rows; `off_policy_reshape = p_div_p_0.1` (f above, gamma 0.1);
`loss_remove_clip = True` (the on-policy ratio unclipped: clip_policy false here); `loss_remove_token_mean = True`
(the sum over the padded width: Dr. GRPO's aggregation); entropy coefficient 0.001 over all response tokens,
demonstration included; no KL; lr 1e-6, temperature 1. The paper's step count is UNVERIFIED.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import DEMO, POLICY, Experience
from posttrain.objectives.base import Term, redefault, register_objective, terms
from posttrain.objectives.grpo import GRPOConfig, grpo_plan
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput
from posttrain.rl.metrics import policy_metrics
from posttrain.rl.surrogate import Surrogate, advantages, clipped_surrogate, truncated_is_weight
from posttrain.sources.plan import RolloutPlan


@dataclass(frozen=True)
class LUFFYConfig(GRPOConfig):
    """LUFFY: one demonstration in every group, policy shaping on its tokens (the authors' settings)."""

    aggregation: str = redefault(GRPOConfig, "aggregation", "seq_mean_token_sum_norm")
    advantage: str = redefault(GRPOConfig, "advantage", "group_mean")
    beta: float = redefault(GRPOConfig, "beta", 0.0)
    gamma: float = field_doc(0.1, "policy shaping f(p) = p / (p + gamma) on demonstration tokens (authors: 0.1)")
    clip_policy: bool = field_doc(False, "clip the sampled tokens' ratio at [1 - eps_low, 1 + eps_high] (the authors "
                                         "remove the clip: loss_remove_clip)")
    entropy_coef: float = field_doc(0.001, "c_H of the entropy bonus -c_H token_mean(H) over every response token "
                                           "(0 = none)")
    demos_in_group: int = field_doc(1, "demonstrations added to each group (1 as the authors; 0 = Dr. GRPO)")

    def check(self) -> None:
        super().check()
        require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        require(self.demos_in_group in (0, 1), "demos_in_group", f"must be 0 or 1, got {self.demos_in_group}")
        require(self.beta == 0, "beta", f"LUFFY has no KL term (the authors use none); must be 0, got {self.beta}")


def shaped(p: Tensor, gamma: float) -> Tensor:
    """f(p) = p / (p + gamma), differentiable.   [B, L] -> [B, L]"""
    return p / (p + gamma)


@register_objective("luffy", LUFFYConfig)
class LUFFY:
    source = "rollouts"

    def __init__(self, config: LUFFYConfig):
        self.config = config
        self.needs = frozenset({"entropy"} if config.entropy_coef > 0 or config.entropy_metric else set())
        extra = {"entropy": Term(frozenset({DEMO, POLICY}), "token_mean")} if config.entropy_coef > 0 else {}
        self.terms = terms(config.aggregation, DEMO, POLICY, **extra)

    def rollout_plan(self) -> RolloutPlan:
        return grpo_plan(self.config, reference=False, demos_in_group=self.config.demos_in_group)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        c = self.config
        sampled = exp.target_mask * (exp.source[:, 1:] == POLICY)                    # [B, L] sampled loss tokens
        mixed = mixed_policy_loss(c, out, exp)
        metrics = policy_metrics(mixed.surrogate, mixed.ratio, out.entropy, sampled) | mixed.metrics
        if c.entropy_coef == 0:
            return {"loss": mixed.loss}, metrics
        return {"loss": mixed.loss, "entropy": -c.entropy_coef * out.entropy}, metrics   # - c_H H, with grad


class MixedPolicyLoss(NamedTuple):
    loss: Tensor          # [B, L] -A f(p) on demonstration tokens, w * -A r (or clipped) on sampled tokens
    surrogate: Surrogate  # the sampled tokens' clip bookkeeping
    ratio: Tensor         # [B, L] r = pi / pi_old
    metrics: dict         # demo/prob, demo/shaping


def mixed_policy_loss(c: LUFFYConfig, out: PolicyOutput, exp: Experience,
                      weight: Tensor | None = None) -> MixedPolicyLoss:
    """LUFFY's per-token loss (the equations above); `weight` [B, L] multiplies the sampled tokens' term (SRFT)."""
    demo = exp.source[:, 1:] == DEMO                                             # [B, L] demonstration tokens
    logp = out.logprobs                                                          # [B, L] log pi(o_t|s_t)
    adv = advantages(exp)                                                        # [B, L] A_i
    old = exp.old_logprobs if exp.old_logprobs is not None else logp.detach()    # [B, L] log pi_old
    ratio = torch.exp(logp - old)                                                # [B, L] r
    eps = (c.eps_low, c.eps_high) if c.clip_policy else (math.inf, math.inf)
    pg = clipped_surrogate(ratio, adv, *eps, c.dual_clip if c.clip_policy else None)   # -r A (or clipped)
    on_policy = pg.loss if weight is None else weight * pg.loss
    if c.is_cap is not None and exp.sampler_logprobs is not None:
        on_policy = truncated_is_weight(old, exp.sampler_logprobs, c.is_cap) * on_policy   # NaN -> w = 1 on demos
    p = logp.exp()                                                               # [B, L] pi(o_t|s_t), with grad
    loss = torch.where(demo, -adv * shaped(p, c.gamma), on_policy)               # [B, L]
    demo_mask = exp.target_mask * demo                                           # [B, L]
    metrics = {"demo/prob": masked_mean(p, demo_mask), "demo/shaping": masked_mean(shaped(p, c.gamma), demo_mask)}
    return MixedPolicyLoss(loss, pg, ratio, metrics)
