"""Advantage estimators (a registry) and whitening across processes. Sources and checks: docs/provenance.md, "Advantage
estimators".

Outcome estimators turn one scalar reward per sample, R_i [B], into A_i [B], broadcast to every loss token:
    group_zscore   A_i = (R_i - mean_G R) / (std_G R + eps)      GRPO (arXiv 2402.03300, Sec. 4.1.2)
    group_mean     A_i =  R_i - mean_G R                          Dr. GRPO (arXiv 2503.20783, Sec. 3.2)
    rloo           A_i =  R_i - mean_{j in G, j != i} R_j         RLOO (arXiv 2402.14740)
    batch_norm     A_i = (R_i - mean_B R) / sqrt(var_B R + eps)   over the whole batch, all processes (REINFORCE++)
The token-level estimator takes per-token rewards r_t [B, L] and values V_t [B, L]:
    gae            delta_t = r_t + gamma V_{t+1} - V_t,   A_t = sum_l (gamma lambda)^l delta_{t+l},   returns = A + V
                   (Schulman et al., arXiv 1506.02438 eq. 16; as used by ReFT, arXiv 2401.08967, Sec. 3)

Groups (G) are the samples sharing a `group` id; all samples of a group must be on the same process (the rollout
builder keeps a prompt's G completions together). Whole-batch statistics (batch_norm, whitening) are exact over
processes through a `reduce` callback: a function summing a tensor over processes, or an accelerate Accelerator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from posttrain.registry import Registry
from posttrain.rl.kl import kl_reward_penalty

Reduce = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class AdvantageParams:
    """The estimator settings an objective config carries (GRPOConfig / PPOConfig.advantage_params)."""

    std_eps: float = 1e-6         # eps of the group std (TRL uses 1e-4, verl 1e-6)
    std_unbiased: bool = True     # Bessel's correction in std / var (TRL and verl: torch.std, unbiased)
    gamma: float = 1.0            # GAE discount
    lam: float = 0.95             # GAE lambda
    whiten: bool = False          # whiten the advantages over the whole batch, all processes, afterwards
    median_center: bool = False   # then subtract the token median over the whole batch (SASR's G+ / G- split)


@dataclass
class AdvantageInputs:
    rewards: Tensor                # [B] outcome reward R_i, or [B, L] per-token rewards r_t (gae)
    mask: Tensor                   # [B, L] loss mask over predicted positions (Experience.target_mask)
    group: Tensor | None = None    # [B] group ids (group estimators)
    values: Tensor | None = None   # [B, L] V(s_t) of the rollout (gae)
    reduce: Any = None             # sum over processes: callable, Accelerator, or None (one process)


ADVANTAGES: Registry = Registry("advantage estimator")


def compute_advantages(name: str, params: AdvantageParams, x: AdvantageInputs) -> tuple[Tensor, Tensor | None]:
    """The named estimator, then optional whitening -> advantages [B, L] (0 off the mask), returns [B, L] or None."""
    adv, returns = ADVANTAGES.get(name)(x, params)
    if params.whiten:
        adv = whiten(adv, x.mask, x.reduce, unbiased=params.std_unbiased)
    if params.median_center:
        adv = (adv - token_median(adv, x.mask, x.reduce)) * x.mask.to(adv.dtype)
    return adv, returns


def token_median(adv: Tensor, mask: Tensor, reduce: Any = None) -> float:
    """The median of the advantages of all loss tokens of the batch, every process included (a lower median).

    The rows of an outcome estimator carry one advantage on all their tokens, so this is the median of the per-row
    advantages weighted by the rows' token counts. Needs the rows of every process: `reduce` an accelerate
    Accelerator (its gather), or None for one process."""
    m = mask.to(torch.float64)
    counts = m.sum(-1)                                                     # [B] tokens per row
    first = (m.cumsum(-1) == 1) & (m > 0)                                  # [B, L] each row's first loss token
    values = (adv.to(torch.float64) * first).sum(-1)                       # [B] the row's advantage
    if reduce is not None:
        if not hasattr(reduce, "gather"):
            raise ValueError("token_median needs the accelerate Accelerator to gather every process's rows")
        values, counts = reduce.gather(values), reduce.gather(counts)
    order = torch.argsort(values, stable=True)
    cum = counts[order].cumsum(0)                                          # tokens up to each sorted row
    if cum.numel() == 0 or float(cum[-1]) == 0:
        return 0.0
    return float(values[order][torch.searchsorted(cum, cum[-1] / 2)])      # first row reaching half the tokens


# ------------------------------------------------------------------------------------------ outcome estimators
def _group_index(group: Tensor) -> tuple[Tensor, Tensor]:
    """inverse [B] (dense group index of each sample), n [K] (samples per group)."""
    _, inverse = torch.unique(group, return_inverse=True)                  # [B] in 0..K-1
    n = torch.bincount(inverse).to(torch.float64)                          # [K]
    return inverse, n


def _group_sum(x: Tensor, inverse: Tensor, k: int) -> Tensor:
    return torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inverse, x)   # [K]


def _out_dtype(rewards: Tensor) -> torch.dtype:
    return rewards.dtype if rewards.is_floating_point() else torch.float32


def group_centered(rewards: Tensor, group: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """R_i - mean_G R [B], with the dense group index [B] and group sizes n [K] (float64 inside)."""
    r = rewards.to(torch.float64)
    inverse, n = _group_index(group)
    mean = _group_sum(r, inverse, len(n)) / n                              # [K] mean_G R
    return r - mean[inverse], inverse, n


def group_mean_advantage(rewards: Tensor, group: Tensor) -> Tensor:
    """A_i = R_i - mean_G R.   [B], [B] -> [B]"""
    return group_centered(rewards, group)[0].to(_out_dtype(rewards))


def group_zscore_advantage(rewards: Tensor, group: Tensor, eps: float = 1e-6, unbiased: bool = True) -> Tensor:
    """A_i = (R_i - mean_G R) / (std_G R + eps); std with Bessel's correction if `unbiased`. A group of one, or of
    equal rewards, gets 0 (also with eps = 0).   [B], [B] -> [B]"""
    dev, inverse, n = group_centered(rewards, group)                       # R_i - mean_G R
    var = _group_sum(dev * dev, inverse, len(n)) / ((n - 1).clamp(min=1) if unbiased else n)   # [K] var_G R
    std = var.sqrt()[inverse]                                              # [B] std_G R
    return torch.where(dev == 0, 0.0, dev / (std + eps)).to(_out_dtype(rewards))


def rloo_advantage(rewards: Tensor, group: Tensor) -> Tensor:
    """A_i = R_i - (sum_G R - R_i) / (n - 1) = n / (n - 1) (R_i - mean_G R). A group of one gets 0.   [B] -> [B]"""
    dev, inverse, n = group_centered(rewards, group)
    return (dev * (n / (n - 1).clamp(min=1))[inverse]).to(_out_dtype(rewards))


# ------------------------------------------------------------------------------------------------- whitening
def _reducer(reduce: Any) -> Reduce:
    if reduce is None:
        return lambda t: t
    if hasattr(reduce, "reduce"):                                          # an accelerate Accelerator
        return lambda t: reduce.reduce(t, "sum")
    return reduce


def whiten(x: Tensor, mask: Tensor, reduce: Any = None, eps: float = 1e-8, unbiased: bool = True,
           shift_mean: bool = True) -> Tensor:
    """(x - mean) / sqrt(var + eps) with mean and var over the masked entries of *all processes* -> x's shape, 0 off
    the mask. `reduce` sums a tensor over processes (callable or Accelerator); with None, this process only.
    With shift_mean=False the mean is added back (scale only)."""
    total = _reducer(reduce)
    m = mask.to(torch.float64)
    x64 = x.to(torch.float64)
    sums = total(torch.stack([(x64 * m).sum(), m.sum()]))                  # [sum x, N] over processes
    mean = sums[0] / sums[1].clamp(min=1)
    sq = total(((x64 - mean) ** 2 * m).sum())                              # sum (x - mean)^2 over processes
    var = sq / ((sums[1] - 1).clamp(min=1) if unbiased else sums[1].clamp(min=1))
    out = (x64 - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return (out * m).to(_out_dtype(x))


# ---------------------------------------------------------------------------------------------------- GAE
def discounted_reverse_cumsum(x: Tensor, c: float, chunk: int = 256) -> Tensor:
    """y_t = sum_{s >= t} c^(s - t) x_s along the last dim, vectorised: blocks of `chunk` positions are one matmul
    with the [K, K] matrix M[s, t] = c^(s - t) (s >= t), and a carry c^(end - t) y_end links the blocks
    (a loop over L / chunk blocks, not over tokens; no c^-t factors, so no overflow for small c).   [B, L] -> [B, L]"""
    length = x.shape[-1]
    k = min(chunk, length)
    pos = torch.arange(k, device=x.device)
    lag = pos[:, None] - pos[None, :]                                      # [K, K] s - t
    cpow = torch.tensor(c, dtype=x.dtype, device=x.device).pow(lag.clamp(min=0).to(x.dtype))
    m = torch.where(lag >= 0, cpow, torch.zeros((), dtype=x.dtype, device=x.device))   # [K, K] M[s, t]
    out = torch.empty_like(x)
    carry = torch.zeros(x.shape[:-1], dtype=x.dtype, device=x.device)     # [B] y at the start of the next block
    for end in range(length, 0, -k):
        start = max(0, end - k)
        n = end - start
        steps = torch.arange(n, 0, -1, device=x.device, dtype=x.dtype)     # end - t
        tail = torch.tensor(c, dtype=x.dtype, device=x.device).pow(steps)  # c^(end - t)
        block = x[..., start:end] @ m[:n, :n] + carry[..., None] * tail   # [B, n]
        out[..., start:end] = block
        carry = block[..., 0]
    return out


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """GAE over each row's masked span (one contiguous span per row: a completion) -> advantages, returns [B, L].

    delta_t = r_t + gamma V_{t+1} - V_t  (V past the last token = 0),  A_t = sum_l (gamma lam)^l delta_{t+l},
    returns_t = A_t + V_t; both 0 off the mask.
    """
    m = mask.to(values.dtype)                                              # [B, L]
    starts = (m[:, 1:] > m[:, :-1]).sum(-1) + (m[:, 0] > 0).to(torch.long)
    if bool((starts > 1).any()):
        raise ValueError("gae: the loss mask of a row must be one contiguous span (found rows with several spans)")
    next_v = F.pad(values[:, 1:] * m[:, 1:], (0, 1))                       # V_{t+1}, 0 past the end      [B, L]
    delta = (rewards + gamma * next_v - values) * m                        # delta_t                      [B, L]
    adv = discounted_reverse_cumsum(delta, gamma * lam) * m                # A_t                          [B, L]
    return adv, (adv + values) * m                                         # A_t, returns_t = A_t + V_t


def token_rewards(outcome: Tensor, mask: Tensor, old_logprobs: Tensor | None = None,
                  ref_logprobs: Tensor | None = None, beta: float = 0.0, estimator: str = "k1") -> Tensor:
    """r_t = [t = last] R - beta k(log pi_old, log pi_ref)  (ReFT, arXiv 2401.08967, Sec. 3; k1 by default), 0 off the
    mask.   [B], [B, L] -> [B, L].   `.sum(-1)` of it is the KL-penalised sequence reward for outcome estimators."""
    m = mask.to(torch.float32)
    positions = torch.arange(m.shape[-1], device=m.device, dtype=torch.float32)
    last = (m * (positions + 1)).argmax(-1)                                # [B] index of the last loss token
    r = torch.zeros_like(m)
    rows = m.sum(-1) > 0
    r[rows, last[rows]] = outcome[rows].to(r.dtype)                       # [t = last] R
    if beta > 0:
        r = r + kl_reward_penalty(old_logprobs, ref_logprobs, beta, estimator) * m   # - beta k_t
    return r


# ------------------------------------------------------------------------------- the registry (uniform calls)
def _outcome(x: AdvantageInputs) -> Tensor:
    if x.rewards.dim() != 1:
        raise ValueError(f"outcome advantage estimators take one reward per sample [B], got {tuple(x.rewards.shape)}")
    return x.rewards


def _group(x: AdvantageInputs) -> Tensor:
    if x.group is None:
        raise ValueError("group advantage estimators need group ids (AdvantageInputs.group)")
    return x.group


def _per_token(a: Tensor, mask: Tensor) -> Tensor:
    return a.to(torch.float32)[:, None] * mask.to(torch.float32)          # [B] -> [B, L]


@ADVANTAGES.register("group_zscore")
def _group_zscore(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    return _per_token(group_zscore_advantage(_outcome(x), _group(x), p.std_eps, p.std_unbiased), x.mask), None


@ADVANTAGES.register("group_mean")
def _group_mean(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    return _per_token(group_mean_advantage(_outcome(x), _group(x)), x.mask), None


@ADVANTAGES.register("rloo")
def _rloo(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    return _per_token(rloo_advantage(_outcome(x), _group(x)), x.mask), None


@ADVANTAGES.register("batch_norm")
def _batch_norm(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, None]:
    has_tokens = x.mask.sum(-1) > 0                                        # [B] samples that carry loss
    return _per_token(whiten(_outcome(x), has_tokens, x.reduce, p.std_eps, p.std_unbiased), x.mask), None


@ADVANTAGES.register("gae")
def _gae(x: AdvantageInputs, p: AdvantageParams) -> tuple[Tensor, Tensor]:
    if x.values is None:
        raise ValueError("gae needs the rollout's values (AdvantageInputs.values)")
    rewards = token_rewards(x.rewards, x.mask) if x.rewards.dim() == 1 else x.rewards
    return gae(rewards, x.values, x.mask, p.gamma, p.lam)

