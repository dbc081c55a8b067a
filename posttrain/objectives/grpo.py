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

from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import POLICY, Experience
from posttrain.objectives.base import ObjectiveConfig, register_objective, terms
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput
from posttrain.rl.advantages import ADVANTAGES, AdvantageParams
from posttrain.rl.kl import KL_ESTIMATORS, kl_estimate
from posttrain.rl.metrics import policy_metrics
from posttrain.rl.surrogate import policy_gradient
from posttrain.sources.plan import RolloutPlan


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
    dual_clip: float | None = field_doc(None, "dual-clip constant c > 1: for A < 0 the loss is at most c |A| "
                                              "(null = off)")
    beta: float = field_doc(0.04, "KL coefficient (0 = no KL term and no reference model)")
    kl_estimator: Literal["k1", "k2", "k3"] = field_doc("k3", "sample KL estimator: k2 or k3 in the loss, k1 in the "
                                                              "reward")
    kl_placement: Literal["loss", "reward"] = field_doc(
        "loss", "loss: + beta k_t per token here; reward: R_i - beta sum_t k_t, applied by the experience builder")
    is_cap: float | None = field_doc(
        None, "truncated importance sampling: C in min(pi_old / pi_sampler, C), for a rollout engine whose log-probs "
              "differ from the trainer's (needs Experience.sampler_logprobs; null = off)")
    dynamic_sampling: bool = field_doc(
        False, "drop groups whose rewards are all equal and sample more (DAPO; done by the experience builder)")
    max_sampling_rounds: int = field_doc(8, "dynamic sampling: at most this many generation rounds per batch")
    entropy_metric: bool = field_doc(True, "log the policy entropy of the loss tokens (computed block by block with "
                                           "the log-probs: PolicyOutput.entropy)")
    median_split: bool = field_doc(
        False, "SASR's G+ / G- token split (from a review of arXiv 2505.13026, UNVERIFIED: the paper's use of it is "
               "not known): re-centre the advantages on their median over the batch's tokens, so the tokens above it "
               "(G+) are pushed up and the rest (G-) down")

    def check(self) -> None:
        check_policy_gradient(self)
        require(self.std_eps >= 0, "std_eps", f"must be >= 0, got {self.std_eps}")
        require(not (self.beta > 0 and self.kl_placement == "loss" and self.kl_estimator == "k1"), "kl_estimator",
                "k1 has zero expected gradient as a loss term; use k2/k3 in the loss, or kl_placement: reward")
        require(self.max_sampling_rounds >= 1, "max_sampling_rounds", f"must be >= 1, got {self.max_sampling_rounds}")

    @property
    def advantage_params(self) -> AdvantageParams:
        return AdvantageParams(std_eps=self.std_eps, std_unbiased=self.std_unbiased, whiten=self.whiten_advantages,
                               median_center=self.median_split)


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
    source = "rollouts"

    def __init__(self, config: GRPOConfig):
        self.config = config
        self.needs = frozenset(({"reference"} if config.beta > 0 else set())
                               | ({"entropy"} if config.entropy_metric else set()))
        self.terms = terms(config.aggregation, POLICY)

    def rollout_plan(self) -> RolloutPlan:
        return grpo_plan(self.config, reference="reference" in self.needs)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, Tensor]]:
        return grpo_loss(self.config, out, exp, exp.target_mask)


def grpo_plan(c: GRPOConfig, reference: bool, **guidance) -> RolloutPlan:
    """The rollout plan of a GRPO-family config (advantages, KL placement, dynamic sampling), plus any guidance."""
    in_reward = c.beta > 0 and c.kl_placement == "reward"
    return RolloutPlan(c.advantage, c.advantage_params, kl_beta=c.beta if in_reward else 0.0,
                       kl_estimator=c.kl_estimator, reference=reference, dynamic_sampling=c.dynamic_sampling,
                       max_rounds=c.max_sampling_rounds if c.dynamic_sampling else 1, **guidance)


def grpo_loss(c: GRPOConfig, out: PolicyOutput, exp: Experience, mask: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The GRPO per-token loss [B, L] (clipped policy gradient + beta k in the loss) and its metrics over `mask`."""
    logp = out.logprobs                                                          # [B, L] log pi(o_t|s_t)
    pg = policy_gradient(logp, exp, c.eps_low, c.eps_high, c.dual_clip, c.is_cap, mask)   # w * -min(r A, clip(r) A)
    loss, metrics = pg.loss, dict(pg.metrics)
    kl_in_loss = c.beta > 0 and c.kl_placement == "loss"
    if kl_in_loss and exp.ref_logprobs is None:
        raise ValueError("beta > 0 with the KL in the loss needs Experience.ref_logprobs (the reference model's)")
    if exp.ref_logprobs is not None:
        kl = kl_estimate(logp, exp.ref_logprobs, c.kl_estimator)                 # [B, L] k(z)
        loss = loss + c.beta * kl if kl_in_loss else loss                        # + beta k(z)
        metrics["kl"] = masked_mean(kl, mask)
    metrics |= policy_metrics(pg.surrogate, pg.ratio, out.entropy, mask)
    return loss, metrics
