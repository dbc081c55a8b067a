"""DFT — Dynamic Fine-Tuning (Wu et al., arXiv 2508.05629): SFT with each token's loss scaled by its own probability.

    L_DFT = -(1/N) sum_{i,t} m_{i,t} sg(p_{i,t}) log p_{i,t},   p_{i,t} = pi(y*_{i,t} | s_{i,t})

p is the full-vocabulary softmax probability of the demonstration token at temperature 1, from the same logits,
detached: the gradient is that of -(1/N) sum m p, i.e. the SFT gradient reweighted by p (the paper's "reward
rectification" of SFT's implicit 1/p importance weight). The (1/N) is the recipe's aggregation (`token_mean` is the
paper's). Sources: the formula as restated in ASFT (arXiv 2509.23753, Eq. 3, read from the PDF in the authors' repo)
and the DFT authors' one-line implementation (their README: the CE loss times the detached softmax probability of
the label). The equation number in the DFT paper itself is unverified. Paper setup (docs/provenance.md, DFT): lr
5e-5, batch 256, 1 epoch, cosine, warmup 0.1. TRL 1.16 `SFTConfig(loss_type="dft")` computes the same loss
(tests/test_objectives_demo.py compares them).

Caveat the authors state: DFT helps on open-ended chain-of-thought, less on near-deterministic targets, and its
gradient vanishes as p -> 0, so from a random initialisation it learns far more slowly than SFT.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.experience import DEMO, Experience
from posttrain.objectives.base import ObjectiveConfig, register_objective, terms
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput


@dataclass(frozen=True)
class DFTConfig(ObjectiveConfig):
    """Dynamic Fine-Tuning on demonstrations; no settings beyond the aggregation."""


def dft_per_token(log_p: Tensor) -> Tensor:
    """-sg(p) log p per token, from log p [B, L] (float32) -> [B, L]. Shared with ASFT (one formula)."""
    p = log_p.detach().exp()  # [B, L] sg(p_t)
    return -p * log_p         # [B, L] -sg(p_t) log p_t


@register_objective("dft", DFTConfig)
class DFT:
    source = "demos"
    needs = frozenset()

    def __init__(self, config: DFTConfig):
        self.config = config
        self.terms = terms(config.aggregation, DEMO)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, float]]:
        log_p = out.logprobs          # [B, L] log pi(y*_t | s_t)
        loss = dft_per_token(log_p)   # [B, L] -sg(p_t) log p_t
        mask = exp.target_mask        # [B, L]
        return loss, {"nll": masked_mean(-log_p, mask), "p": masked_mean(log_p.exp(), mask)}
