"""UFT — Unifying supervised and reinforcement fine-tuning (Liu, Farina, Ozdaglar, arXiv 2505.16984):

    L = token_mean_POLICY( w -min(r A, clip(r) A) + beta k3 - c_H H )  +  lambda token_mean_HINT( -log pi(h_t | s_t) )

    hint        every rollout of a prompt continues the same hint: the first separation[k] steps (lines) of the
                solution, k ~ Binomial(num, p(s)), num = min(5, #steps), separation[j] = round(j #steps / num);
                p(s) = 0.05 + 0.45 (1 + cos(pi s / T_hint)) for s <= T_hint, 0 after (no hint): a cosine schedule
                0.95 -> 0.05 over T_hint steps, then 0 (sources/guidance.py draw_hint)
    A           GRPO's group z-score over the G rollouts of the prompt (all share one hint)
    lambda      0.001: a small log-likelihood term on the hint tokens (the supervised part)

Followed: the authors' code (liumy2010/UFT@ad3c8ec; docs/provenance.md): the hint draw
(verl/utils/dataset/rl_dataset.py), the loss (verl/workers/actor/dp_actor.py update_policy: pg_loss -
entropy_coeff * entropy + sft_loss_coef * masked mean CE over the hint, + kl_loss_coef * KL), the settings of run.py
and scripts/train.sh: 4 rollouts, sft_loss_coef 0.001, lower/upper p 0.05 / 0.95, T = 500, T_hint = 300, lr 1e-6,
KL in the loss (verl's low_var_kl = k3; its default coefficient 0.001), verl's default entropy coefficient 0.001.
The hint sits after the prompt, outside the response: the rewards read the continuation only (`hint_in_reward`
false); a task whose verifier reads every line (the `steps` reward) needs it true. Provenance: the hint tokens are
PREFIX, the continuation POLICY. The CE is scored at the rollout temperature, as the code's logits are.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import POLICY, PREFIX, Experience
from posttrain.objectives.base import Term, redefault, register_objective, terms
from posttrain.objectives.grpo import GRPOConfig, grpo_loss, grpo_plan
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput
from posttrain.schedules import Schedule
from posttrain.sources.guidance import HintSampling
from posttrain.sources.plan import RolloutPlan


@dataclass(frozen=True)
class UFTConfig(GRPOConfig):
    """UFT: GRPO on rollouts that continue an annealed solution hint, plus a small CE term on the hint."""

    aggregation: str = redefault(GRPOConfig, "aggregation", "token_mean")
    beta: float = redefault(GRPOConfig, "beta", 0.001)
    hint_probability: float | Schedule = field_doc(
        Schedule("cosine", start=0.95, end=0.05, steps=300, after=0.0),
        "p(s): chance each of the hint's split points is passed (authors: cosine 0.95 -> 0.05 over T_hint = 300 "
        "steps, 0 after); 0 = GRPO")
    max_splits: int = field_doc(5, "num = min(max_splits, #solution lines) split points (authors: 5)")
    hint_coef: float = field_doc(0.001, "lambda of the CE term on the hint tokens (authors: sft_loss_coef 0.001)")
    entropy_coef: float = field_doc(0.001, "c_H of the entropy bonus over the continuation (verl default 0.001)")
    hint_in_reward: bool = field_doc(False, "rewards read hint + continuation (false: the continuation only, as the "
                                            "authors' hint sits in the prompt)")

    def check(self) -> None:
        super().check()
        lo, hi = self.hint_probability.bounds() if isinstance(self.hint_probability, Schedule) else \
            (self.hint_probability, self.hint_probability)
        require(0.0 <= lo and hi <= 1.0, "hint_probability", f"must stay within [0, 1], got values from {lo} to {hi}")
        require(self.max_splits >= 1, "max_splits", f"must be >= 1, got {self.max_splits}")
        require(self.hint_coef >= 0, "hint_coef", f"must be >= 0, got {self.hint_coef}")
        require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")


@register_objective("uft", UFTConfig)
class UFT:
    source = "rollouts"

    def __init__(self, config: UFTConfig):
        self.config = config
        self.needs = frozenset(({"reference"} if config.beta > 0 else set())
                               | ({"entropy"} if config.entropy_coef > 0 or config.entropy_metric else set()))
        self.terms = terms(config.aggregation, POLICY, hint=Term(frozenset({PREFIX}), "token_mean"))

    def rollout_plan(self) -> RolloutPlan:
        c = self.config
        return grpo_plan(c, reference="reference" in self.needs,
                         hints=HintSampling(c.hint_probability, c.max_splits, c.hint_in_reward))

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        c = self.config
        policy = exp.target_mask * (exp.source[:, 1:] == POLICY)                     # [B, L] the continuation
        hint = exp.target_mask * (exp.source[:, 1:] == PREFIX)                       # [B, L] the hint
        loss, metrics = grpo_loss(c, out, exp, policy)                               # [B, L] GRPO (+ beta k3)
        if c.entropy_coef > 0:
            loss = loss - c.entropy_coef * out.entropy                               # - c_H H, with grad
        nll = -out.logprobs                                                          # [B, L] -log pi(h_t | s_t)
        metrics["hint/nll"] = masked_mean(nll, hint)
        return {"loss": loss, "hint": c.hint_coef * nll}, metrics
