"""PPO with a value head, as in ReFT (arXiv 2401.08967, Sec. 3; code lqtrung1998/mwp_ReFT), per token:

    l_t = w_t * -min( r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t )                 policy (PPO eq. 7)
          + vf_coef * 0.5 * max( (V_t - R_t)^2, (clip(V_t, V_old_t - eps_v, V_old_t + eps_v) - R_t)^2 )   value

    r_t = pi(o_t|s_t) / pi_old(o_t|s_t)   A_t = GAE of r_t = [t = last] R - beta (log pi_old - log pi_ref) (k1 in the
    reward), whitened over the batch; R_t = A_t + V_old_t the returns; V_t the current value head's output
    (PolicyOutput.values), V_old_t the rollout's (Experience.values). All of A, R_t, V_old come from the experience
    builder (rl/advantages.py: token_rewards, gae, whiten); w_t is the optional truncated IS weight.

ReFT's settings: clip 0.2, value clip 0.2, vf_coef 5, gamma 1, lambda 0.95, beta 0.01 (program CoT) / 0.05 (NL CoT),
2 PPO epochs per rollout batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import POLICY, Experience
from posttrain.objectives.base import ObjectiveConfig, redefault, register_objective, terms
from posttrain.objectives.grpo import GRPOConfig, check_policy_gradient
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput
from posttrain.rl.advantages import AdvantageParams
from posttrain.rl.kl import kl_estimate
from posttrain.rl.metrics import policy_metrics
from posttrain.rl.surrogate import policy_gradient
from posttrain.sources.plan import RolloutPlan


@dataclass(frozen=True)
class PPOConfig(ObjectiveConfig):
    """PPO with a value head on the shared backbone (ReFT defaults)."""

    advantage: str = redefault(GRPOConfig, "advantage", "gae")
    gamma: float = field_doc(1.0, "GAE discount gamma")
    lam: float = field_doc(0.95, "GAE lambda")
    whiten_advantages: bool = redefault(GRPOConfig, "whiten_advantages", True)
    eps_low: float = redefault(GRPOConfig, "eps_low", 0.2)
    eps_high: float = redefault(GRPOConfig, "eps_high", 0.2)
    dual_clip: float | None = redefault(GRPOConfig, "dual_clip", None)
    value_clip: float = field_doc(0.2, "eps_v in clip(V, V_old - eps_v, V_old + eps_v) of the clipped value loss")
    vf_coef: float = field_doc(5.0, "weight of the value loss (ReFT's scripts: 5)")
    beta: float = field_doc(0.05, "KL coefficient in the per-token reward (0 = no reference model)")
    kl_estimator: Literal["k1", "k2", "k3"] = field_doc(
        "k1", "estimator of the KL in the per-token reward (k1 = log pi_old - log pi_ref, as ReFT)")
    is_cap: float | None = redefault(GRPOConfig, "is_cap", None)
    entropy_metric: bool = redefault(GRPOConfig, "entropy_metric", True)

    def check(self) -> None:
        check_policy_gradient(self)
        require(0 <= self.gamma <= 1, "gamma", f"must be in [0, 1], got {self.gamma}")
        require(0 <= self.lam <= 1, "lam", f"must be in [0, 1], got {self.lam}")
        require(self.value_clip > 0, "value_clip", f"must be > 0, got {self.value_clip}")
        require(self.vf_coef >= 0, "vf_coef", f"must be >= 0, got {self.vf_coef}")

    @property
    def advantage_params(self) -> AdvantageParams:
        return AdvantageParams(gamma=self.gamma, lam=self.lam, whiten=self.whiten_advantages)


@register_objective("ppo", PPOConfig)
class PPO:
    source = "rollouts"

    def __init__(self, config: PPOConfig):
        self.config = config
        self.needs = frozenset({"values"} | ({"reference"} if config.beta > 0 else set())
                               | ({"entropy"} if config.entropy_metric else set()))
        self.terms = terms(config.aggregation, POLICY)

    def rollout_plan(self) -> RolloutPlan:
        c = self.config                                      # the KL is always in the per-token reward (ReFT)
        return RolloutPlan(c.advantage, c.advantage_params, kl_beta=c.beta, kl_estimator=c.kl_estimator,
                           reference=c.beta > 0, values=True)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        c, mask = self.config, exp.target_mask                                       # mask [B, L]
        if out.values is None or exp.values is None or exp.returns is None:
            raise ValueError("ppo needs PolicyOutput.values (wrap the model in rl.value_head.ValueHeadModel) and "
                             "Experience.values / .returns from the rollout")
        logp = out.logprobs                                                          # [B, L] log pi(o_t|s_t)
        pg = policy_gradient(logp, exp, c.eps_low, c.eps_high, c.dual_clip, c.is_cap, mask)   # w * -min(r A, clip(r) A)
        metrics = dict(pg.metrics)
        v, v_old, ret = out.values, exp.values, exp.returns                          # [B, L] V_t, V_old_t, R_t
        v_clipped = v_old + (v - v_old).clamp(-c.value_clip, c.value_clip)           # clip(V, V_old -+ eps_v)
        value = 0.5 * torch.max((v - ret) ** 2, (v_clipped - ret) ** 2)              # [B, L] clipped value loss
        loss = pg.loss + c.vf_coef * value                                           # [B, L]
        metrics |= policy_metrics(pg.surrogate, pg.ratio, out.entropy, mask)
        metrics |= {"vf_loss": masked_mean(value, mask), "value/mean": masked_mean(v, mask),
                    "vf_clip_frac": masked_mean((v - ret) ** 2 < (v_clipped - ret) ** 2, mask)}
        if exp.ref_logprobs is not None:
            metrics["kl"] = masked_mean(kl_estimate(logp, exp.ref_logprobs, c.kl_estimator), mask)
        return loss, metrics
