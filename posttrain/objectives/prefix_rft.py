"""Prefix-RFT — blending SFT and RFT with prefix sampling (Huang et al., arXiv 2507.01679), per token of row i:

    l_{i,t} = -min( r_{i,t} A_i, clip(r_{i,t}, 1 - eps_low, 1 + eps_high) A_i )   (dual-clipped at c |A| for A < 0)
              on every response token: the policy's continuation (POLICY) *and* the demonstration prefix (PREFIX),
              whose ratio pi / pi_old has pi_old teacher-forced like the rest (= 1 on the first update)
    L = agg(l) - c_H token_mean(H)

    rollouts   of the G rollouts of a prompt, `prefixed` continue a demonstration prefix of ratio
               l ~ U[low(s), high(s)]: int(l |y*|) tokens, at least `min_prefix_tokens`, never the whole
               demonstration (at most |y*| - 1); the response is prefix + continuation, cut at max_new_tokens
    A_i        over all G rollouts of the prompt, prefixed and plain (Dr. GRPO: R_i - mean_G R by default)
    entropy    the floor(rho(s) N) lowest-entropy prefix tokens of the rollout batch get A = 0 (only the
    selection  high-entropy demonstration tokens teach; the continuation is untouched)

Followed: the authors' code (ZeroYuHuang/prefix_rft@5f5d2a1, recipe/prefix_rft/; docs/provenance.md):
prefix tokens inside the clipped loss (`enable_clip = True`; `clip_prefix: false` gives them the unclipped -A r),
dual clip c = 3, clip 0.2 / 0.2, entropy coefficient 0.001, no KL, advantage over the dataset-row uid (all K n
rollouts of a prompt), the prefix-ratio bounds as controllers of the step (constant / linear / cosine decay, each a
posttrain schedule), the prefix length clamps.
Chosen here, and why: the entropy selection is made once per rollout batch, over all processes, from the
entropies of the teacher-forced pass before the update (sources/rollouts.py mask_prefix_entropy). The code makes it
per micro-batch from the current forward, which ties the result to how rows are packed into micro-batches and
processes; with one update per batch the entropies are the same and only the quantile's population differs.
Here `prefixed` rollouts each draw their own ratio (the code's K variants with n = 1 continuation each).
UNVERIFIED (the repository ships no training config): the paper's K, number of unprefixed variants, n,
min_prefix_len and schedule lengths; the defaults below follow the secondary summaries (one of 8 rollouts prefixed,
high 0.95, low cosine 0.95 -> 0.05 over 500 steps, rho 0.8 = "update only the top-20% entropy prefix tokens").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import POLICY, PREFIX, Experience
from posttrain.objectives.base import Term, redefault, register_objective, terms
from posttrain.objectives.grpo import GRPOConfig, grpo_plan
from posttrain.policy import PolicyOutput
from posttrain.rl.metrics import policy_metrics
from posttrain.rl.surrogate import advantages, clipped_surrogate, policy_gradient
from posttrain.schedules import Schedule
from posttrain.sources.guidance import PrefixSampling
from posttrain.sources.plan import RolloutPlan


@dataclass(frozen=True)
class PrefixRFTConfig(GRPOConfig):
    """Prefix-RFT: some rollouts continue a demonstration prefix; prefix tokens are trained by the clipped loss."""

    aggregation: str = redefault(GRPOConfig, "aggregation", "seq_mean_token_sum_norm")
    advantage: str = redefault(GRPOConfig, "advantage", "group_mean")
    beta: float = redefault(GRPOConfig, "beta", 0.0)
    dual_clip: float | None = redefault(GRPOConfig, "dual_clip", 3.0)
    prefixed: int = field_doc(1, "rollouts per prompt (of rollout.sampling.n) that continue a demonstration prefix "
                                 "(UNVERIFIED: one of 8 per the summaries); 0 = GRPO")
    low: float | Schedule = field_doc(Schedule("cosine", start=0.95, end=0.05, steps=500),
                                      "lower bound of the prefix ratio l at step s (UNVERIFIED: cosine 0.95 -> 0.05)")
    high: float | Schedule = field_doc(0.95, "upper bound of the prefix ratio at step s (UNVERIFIED: 0.95)")
    min_prefix_tokens: int = field_doc(1, "shortest prefix in tokens (UNVERIFIED)")
    entropy_mask: float | Schedule = field_doc(0.8, "rho: fraction of the batch's prefix tokens, lowest entropy "
                                                    "first, whose advantage is zeroed (UNVERIFIED: 0.8)")
    clip_prefix: bool = field_doc(True, "prefix tokens get the clipped surrogate (authors' enable_clip); false: the "
                                        "unclipped -A r")
    entropy_coef: float = field_doc(0.001, "c_H of the entropy bonus over every response token (0 = none)")

    def check(self) -> None:
        super().check()
        require(self.prefixed >= 0, "prefixed", f"must be >= 0, got {self.prefixed}")
        require(self.min_prefix_tokens >= 0, "min_prefix_tokens", f"must be >= 0, got {self.min_prefix_tokens}")
        require(self.entropy_coef >= 0, "entropy_coef", f"must be >= 0, got {self.entropy_coef}")
        require(self.beta == 0, "beta", f"no KL term here (the authors run without one); must be 0, got {self.beta}")
        for name in ("low", "high", "entropy_mask"):
            s = getattr(self, name)
            lo, hi = s.bounds() if isinstance(s, Schedule) else (s, s)
            require(0.0 <= lo and hi <= 1.0, name, f"must stay within [0, 1], got values from {lo} to {hi}")


@register_objective("prefix_rft", PrefixRFTConfig)
class PrefixRFT:
    source = "rollouts"

    def __init__(self, config: PrefixRFTConfig):
        self.config = config
        self.needs = frozenset({"entropy"} if config.entropy_coef > 0 or config.entropy_metric else set())
        extra = {"entropy": Term(frozenset({PREFIX, POLICY}), "token_mean")} if config.entropy_coef > 0 else {}
        self.terms = terms(config.aggregation, PREFIX, POLICY, **extra)

    def rollout_plan(self) -> RolloutPlan:
        c = self.config
        prefixes = None if not c.prefixed else \
            PrefixSampling(c.prefixed, c.low, c.high, c.min_prefix_tokens, c.entropy_mask)
        return grpo_plan(c, reference=False, prefixes=prefixes)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        c, mask = self.config, exp.target_mask                                       # [B, L] response tokens
        logp = out.logprobs                                                          # [B, L] log pi(o_t|s_t)
        pg = policy_gradient(logp, exp, c.eps_low, c.eps_high, c.dual_clip, c.is_cap, mask)   # clipped, all tokens
        loss = pg.loss
        prefix = exp.source[:, 1:] == PREFIX                                         # [B, L]
        if not c.clip_prefix:                                                        # -A r on prefix tokens
            unclipped = clipped_surrogate(pg.ratio, advantages(exp), float("inf"), float("inf")).loss   # -A r
            loss = torch.where(prefix, unclipped, loss)
        metrics = dict(pg.metrics) | policy_metrics(pg.surrogate, pg.ratio, out.entropy, mask)
        if c.entropy_coef == 0:
            return {"loss": loss}, metrics
        return {"loss": loss, "entropy": -c.entropy_coef * out.entropy}, metrics      # - c_H H, with grad
