"""GRPO and its presets Dr. GRPO and DAPO: one loss, three default configs.

GRPO (DeepSeekMath, arXiv 2402.03300, eq. 3; the KL estimator is eq. 4), per token of sample i:

    l_{i,t} = w_{i,t} * -min( r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i )  +  beta * k(z_{i,t})

    r_{i,t} = pi(o_t | s_t) / pi_old(o_t | s_t)       importance ratio; pi_old = pi.detach() when the rollout is used
                                                       for one update (DeepSeekMath's setting: r == 1, gradient A)
    A_i                                                outcome advantage from the experience builder (config.advantage)
    k(z), z = log pi_ref - log pi                      k2 or k3 (k3 in GRPO) in the loss; or k1 in the reward
                                                       (kl_placement: reward, applied by the experience builder)
    w_{i,t} = min(pi_old / pi_sampler, C)              truncated importance sampling (is_cap; needs sampler_logprobs)
    optional dual clip for A < 0 (rl/surrogate.py)

Presets (the math is the same; only the defaults differ):
    grpo     group_zscore advantages, seq_mean_token_mean, eps 0.2, beta 0.04, k3 in the loss     (arXiv 2402.03300)
    dr_grpo  group_mean advantages (no std), seq_mean_token_sum_norm, beta 0                     (arXiv 2503.20783)
    dapo     eps_low 0.2 / eps_high 0.28, token_mean, beta 0, dynamic sampling                    (arXiv 2503.14476)
The 1/|o_i|, 1/sum|o_i| or 1/(B L_max) of each paper is the aggregation, not this file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import Experience
from posttrain.objectives.base import ObjectiveConfig, register_objective
from posttrain.policy import PolicyOutput
from posttrain.rl.advantages import ADVANTAGES, AdvantageParams
from posttrain.rl.kl import KL_ESTIMATORS, kl_estimate
from posttrain.rl.metrics import masked_stats, policy_metrics, token_mean
from posttrain.rl.surrogate import clipped_surrogate, truncated_is_weight


@dataclass(frozen=True)
class GRPOConfig(ObjectiveConfig):
    """Group Relative Policy Optimization (DeepSeekMath defaults)."""

    aggregation: str = dataclasses.field(default="seq_mean_token_mean",
                                         metadata=ObjectiveConfig.__dataclass_fields__["aggregation"].metadata)
    advantage: str = field_doc("group_zscore", "advantage estimator the experience builder applies (rl/advantages.py)")
    std_eps: float = field_doc(1e-6, "eps in (R - mean_G) / (std_G + eps) (TRL uses 1e-4, verl 1e-6)")
    std_unbiased: bool = field_doc(True, "Bessel's correction in the group std")
    whiten_advantages: bool = field_doc(False, "whiten the advantages over the whole batch (all processes) afterwards")
    eps_low: float = field_doc(0.2, "lower clip: r >= 1 - eps_low")
    eps_high: float = field_doc(0.2, "upper clip: r <= 1 + eps_high (clip-higher when > eps_low)")
    dual_clip: float | None = field_doc(None, "dual-clip constant c > 1: for A < 0 the loss is at most c |A| (null = off)")
    beta: float = field_doc(0.04, "KL coefficient (0 = no KL term and no reference model)")
    kl_estimator: Literal["k1", "k2", "k3"] = field_doc("k3", "sample KL estimator: k2 or k3 in the loss, k1 in the reward")
    kl_placement: Literal["loss", "reward"] = field_doc(
        "loss", "loss: + beta k_t per token here; reward: R_i - beta sum_t k_t, applied by the experience builder")
    is_cap: float | None = field_doc(
        None, "truncated importance sampling: C in min(pi_old / pi_sampler, C), for a rollout engine whose log-probs "
              "differ from the trainer's (needs Experience.sampler_logprobs; null = off)")
    dynamic_sampling: bool = field_doc(
        False, "drop groups whose rewards are all equal and sample more (DAPO; done by the experience builder)")
    max_sampling_rounds: int = field_doc(8, "dynamic sampling: at most this many generation rounds per batch")
    entropy_metric: bool = field_doc(True, "log the policy entropy of the loss tokens (no gradient; computed block by "
                                           "block with the log-probs: PolicyOutput.entropy)")

    def check(self) -> None:
        check_policy_gradient(self)
        require(self.std_eps >= 0, "std_eps", f"must be >= 0, got {self.std_eps}")
        require(not (self.beta > 0 and self.kl_placement == "loss" and self.kl_estimator == "k1"), "kl_estimator",
                "k1 has zero expected gradient as a loss term; use k2/k3 in the loss, or kl_placement: reward")
        require(self.max_sampling_rounds >= 1, "max_sampling_rounds", f"must be >= 1, got {self.max_sampling_rounds}")

    @property
    def advantage_params(self) -> AdvantageParams:
        return AdvantageParams(std_eps=self.std_eps, std_unbiased=self.std_unbiased, whiten=self.whiten_advantages)


def check_policy_gradient(c) -> None:
    """Checks shared by the clipped policy-gradient objectives (GRPO family, PPO)."""
    ObjectiveConfig.check(c)
    require(c.advantage in ADVANTAGES, "advantage", f"got {c.advantage!r}; allowed: {', '.join(ADVANTAGES.names())}")
    require(0 <= c.eps_low < 1, "eps_low", f"must be in [0, 1), got {c.eps_low}")
    require(c.eps_high >= 0, "eps_high", f"must be >= 0, got {c.eps_high}")
    require(c.dual_clip is None or c.dual_clip > 1, "dual_clip", f"must be > 1 (or null), got {c.dual_clip}")
    require(c.beta >= 0, "beta", f"must be >= 0, got {c.beta}")
    require(c.kl_estimator in KL_ESTIMATORS, "kl_estimator",
            f"got {c.kl_estimator!r}; allowed: {', '.join(KL_ESTIMATORS.names())}")
    require(c.is_cap is None or c.is_cap >= 1, "is_cap", f"must be >= 1 (or null), got {c.is_cap}")


def preset(base: type, name: str, doc: str, **defaults) -> type:
    """A frozen subclass of config `base` with other defaults (each field keeps its documentation)."""
    fields = [(f.name, f.type, dataclasses.field(default=defaults.pop(f.name), metadata=f.metadata))
              for f in dataclasses.fields(base) if f.name in defaults]
    if defaults:
        raise TypeError(f"{name}: {base.__name__} has no fields {sorted(defaults)}")
    cls = dataclasses.make_dataclass(name, fields, bases=(base,), frozen=True)
    cls.__module__, cls.__doc__ = base.__module__, doc
    return cls


DrGRPOConfig = preset(GRPOConfig, "DrGRPOConfig", "Dr. GRPO: GRPO done right (no std, no length normalisation).",
                      advantage="group_mean", aggregation="seq_mean_token_sum_norm", beta=0.0)
DAPOConfig = preset(GRPOConfig, "DAPOConfig", "DAPO: clip-higher, token-level loss, dynamic sampling, no KL.",
                    eps_high=0.28, aggregation="token_mean", beta=0.0, dynamic_sampling=True)


@register_objective("dapo", DAPOConfig)
@register_objective("dr_grpo", DrGRPOConfig)
@register_objective("grpo", GRPOConfig)
class GRPO:
    def __init__(self, config: GRPOConfig):
        self.config = config
        self.needs = frozenset({"rollouts"} | ({"reference"} if config.beta > 0 else set())
                               | ({"entropy"} if config.entropy_metric else set()))

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        c, mask = self.config, exp.target_mask                                       # mask [B, L]
        logp = out.logprobs                                                          # [B, L] log pi(o_t|s_t)
        old_logp = exp.old_logprobs if exp.old_logprobs is not None else logp.detach()   # [B, L] log pi_old
        adv = advantages(exp)                                                        # [B, L] A_i per token
        ratio = torch.exp(logp - old_logp)                                           # [B, L] r_{i,t}
        pg = clipped_surrogate(ratio, adv, c.eps_low, c.eps_high, c.dual_clip)       # -min(r A, clip(r) A)
        loss, metrics = pg.loss, {}
        if c.is_cap is not None and exp.sampler_logprobs is not None:
            w = truncated_is_weight(old_logp, exp.sampler_logprobs, c.is_cap)        # [B, L] min(pi_old/pi_sampler, C)
            loss = w * loss
            metrics |= masked_stats("is_weight", w, mask)
        kl_in_loss = c.beta > 0 and c.kl_placement == "loss"
        if kl_in_loss and exp.ref_logprobs is None:
            raise ValueError("beta > 0 with the KL in the loss needs Experience.ref_logprobs (the reference model's)")
        if exp.ref_logprobs is not None:
            kl = kl_estimate(logp, exp.ref_logprobs, c.kl_estimator)                 # [B, L] k(z)
            loss = loss + c.beta * kl if kl_in_loss else loss                        # + beta k(z)
            metrics["kl"] = token_mean(kl, mask)
        metrics |= policy_metrics(pg, ratio, out.entropy, mask)
        return loss, metrics


def advantages(exp: Experience) -> Tensor:
    """exp.advantages as [B, L] ([B] outcome advantages are broadcast over the tokens)."""
    if exp.advantages is None:
        raise ValueError("this objective needs Experience.advantages (set by the rollout experience builder)")
    return exp.advantages if exp.advantages.dim() == 2 else exp.advantages[:, None]
