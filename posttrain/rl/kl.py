"""Sample estimators of KL(pi || pi_ref) at the sampled token (Schulman, "Approximating KL divergence", 2020; GRPO's
k3: arXiv 2402.03300 eq. 4; docs/provenance.md, "GRPO, Dr. GRPO, DAPO"). The policy entropy is in ops/logprobs.py.

With z = log pi_ref(o_t | s_t) - log pi(o_t | s_t), o_t ~ pi, clamped to [-Z_MAX, Z_MAX]:

    k1 = -z                   unbiased for KL(pi || ref); its expected gradient is 0    -> belongs in the REWARD
    k2 = z^2 / 2              as a loss term, expected gradient = grad KL(pi || ref)     -> loss
    k3 = exp(z) - z - 1       as a loss term, expected gradient = grad KL(ref || pi)     -> loss (GRPO, DeepSeekMath)

Two placements, never both for the same estimate:
  * in the loss: `l_t += beta * kl_estimate(log pi, log pi_ref, k)` (the objective does it; k2 or k3);
  * in the reward: `r_t -= beta * kl_estimate(log pi_old, log pi_ref, k)` at rollout time, with no gradient
    (the experience builder does it through `kl_reward_penalty`; k1, as in PPO-RLHF and ReFT arXiv 2401.08967).
"""
from __future__ import annotations

import torch
from torch import Tensor

from posttrain.registry import Registry

Z_MAX = 20.0   # |log pi_ref - log pi| is clamped to this (as verl does): exp(20) ~ 5e8 keeps k3 finite

KL_ESTIMATORS: Registry = Registry("KL estimator")
KL_ESTIMATORS.register("k1", lambda z: -z)                                 # k1 = -z
KL_ESTIMATORS.register("k2", lambda z: 0.5 * z * z)                        # k2 = z^2 / 2
KL_ESTIMATORS.register("k3", lambda z: torch.expm1(z) - z)                 # k3 = exp(z) - 1 - z


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate k(z), z = clamp(log pi_ref - log pi, -Z_MAX, Z_MAX).   [B, L], [B, L] -> [B, L]"""
    z = (ref_logp - logp).clamp(-Z_MAX, Z_MAX)                             # z = log pi_ref - log pi
    return KL_ESTIMATORS.get(estimator)(z)


def kl_reward_penalty(old_logp: Tensor, ref_logp: Tensor, beta: float, estimator: str = "k1") -> Tensor:
    """The KL term of a per-token reward, -beta * k(log pi_old, log pi_ref), without gradient.   -> [B, L]

    Add it to the rewards before computing advantages (`advantages.token_rewards`); k1 gives PPO/ReFT's
    `r_t = [t = last] R - beta (log pi_old - log pi_ref)`.
    """
    return -beta * kl_estimate(old_logp.detach(), ref_logp.detach(), estimator)
