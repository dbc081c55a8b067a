"""The clipped policy-gradient surrogate shared by GRPO, DAPO and PPO, and the truncated importance-sampling weight
(sources: docs/provenance.md, "GRPO, Dr. GRPO, DAPO").

    l_t = -min( r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t )         PPO (arXiv 1707.06347 eq. 7);
                                                                             clip-higher eps_low != eps_high (DAPO,
                                                                             arXiv 2503.14476, Sec. 3.1)
    dual clip, c > 1, for A_t < 0:  l_t = min(l_t, -c A_t) = min(l_t, c |A_t|)
        (Ye et al., "Mastering Complex Control in MOBA Games with Deep RL", arXiv 1912.09729, Sec. 3: the objective
         max(min(r A, clip(r) A), c A) for A < 0 bounds how far one very off-policy token can push the loss.)

    w_t = min( pi_old^trainer(o_t|s_t) / pi_sampler(o_t|s_t), C )            truncated importance sampling, when the
        rollout engine's numerics (e.g. vLLM) differ from the trainer's (Yao et al., "Your efficient RL framework
        secretly brings you off-policy RL training", 2025); w multiplies the policy-gradient term only.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from posttrain.ops.masked import masked_stats


class Surrogate(NamedTuple):
    loss: Tensor          # [B, L] per-token clipped surrogate loss
    clipped_low: Tensor   # [B, L] bool: r < 1 - eps_low and A < 0 (gradient cut by the lower clip)
    clipped_high: Tensor  # [B, L] bool: r > 1 + eps_high and A > 0 (gradient cut by the upper clip)
    clipped_dual: Tensor  # [B, L] bool: A < 0 and the dual-clip bound c |A| is active


def clipped_surrogate(ratio: Tensor, adv: Tensor, eps_low: float, eps_high: float,
                      dual_clip: float | None = None) -> Surrogate:
    """-min(r A, clip(r, 1-eps_low, 1+eps_high) A), optionally dual-clipped at c |A| for A < 0.   [B, L] -> [B, L]"""
    unclipped = ratio * adv                                                  # r A
    clipped = ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv               # clip(r, 1-eps_low, 1+eps_high) A
    loss = -torch.min(unclipped, clipped)                                    # -min(r A, clip(r) A)
    dual = torch.zeros_like(loss, dtype=torch.bool)
    if dual_clip is not None:
        bound = -dual_clip * adv                                             # c |A| where A < 0
        dual = (adv < 0) & (loss > bound)
        loss = torch.where(dual, bound, loss)                                # min(l, c |A|) for A < 0
    return Surrogate(loss, (ratio < 1.0 - eps_low) & (adv < 0), (ratio > 1.0 + eps_high) & (adv > 0), dual)


def truncated_is_weight(old_logp: Tensor, sampler_logp: Tensor, cap: float) -> Tensor:
    """w = min(exp(log pi_old - log pi_sampler), cap), no gradient; NaN sampler log-probs give w = 1.   -> [B, L]"""
    log_w = torch.nan_to_num(old_logp.detach() - sampler_logp.detach(), nan=0.0)   # log pi_old - log pi_sampler
    return torch.exp(log_w.clamp(max=math.log(cap)))                               # min(exp(.), cap), no overflow


class PolicyGradient(NamedTuple):
    loss: Tensor               # [B, L] w_t * -min(r A, clip(r) A) (dual-clipped when asked)
    surrogate: Surrogate       # the clip bookkeeping, for metrics
    ratio: Tensor              # [B, L] r_t = pi / pi_old
    metrics: dict              # is_weight/{min,mean,max} when truncated IS is on


def policy_gradient(logp: Tensor, exp, eps_low: float, eps_high: float, dual_clip: float | None,
                    is_cap: float | None, mask: Tensor) -> PolicyGradient:
    """The clipped policy-gradient term shared by GRPO, PPO and the hybrids, on the experience's advantages:

        r_t = exp(log pi - log pi_old)     pi_old = Experience.old_logprobs, or pi detached (one update per batch)
        l_t = w_t * -min(r_t A_t, clip(r_t, 1 - eps_low, 1 + eps_high) A_t),  w_t = min(pi_old / pi_sampler, C)

    logp [B, L] (with gradient), exp an Experience with advantages; mask [B, L] for the IS-weight metrics."""
    old = exp.old_logprobs if exp.old_logprobs is not None else logp.detach()   # [B, L] log pi_old
    ratio = torch.exp(logp - old)                                                # [B, L] r_t
    pg = clipped_surrogate(ratio, advantages(exp), eps_low, eps_high, dual_clip)
    loss, metrics = pg.loss, {}
    if is_cap is not None and exp.sampler_logprobs is not None:
        w = truncated_is_weight(old, exp.sampler_logprobs, is_cap)               # [B, L] min(pi_old/pi_sampler, C)
        loss = w * loss
        metrics = masked_stats("is_weight", w, mask)
    return PolicyGradient(loss, pg, ratio, metrics)


def advantages(exp) -> Tensor:
    """exp.advantages as [B, L] ([B] outcome advantages are broadcast over the tokens)."""
    if exp.advantages is None:
        raise ValueError("this objective needs Experience.advantages (set by the rollout experience builder)")
    return exp.advantages if exp.advantages.dim() == 2 else exp.advantages[:, None]
