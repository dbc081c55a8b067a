"""OTR — One-Token Rollout (Ming et al., arXiv 2509.26313): a one-step policy gradient at every demonstration token.

At each completion position t, K candidate tokens are sampled from the temperature-scaled policy
pi'(.|s_t) = softmax(z_t / tau); a candidate earns reward 1 if it is the demonstration token y*_t and beta otherwise:

    L_OTR = -(1/T) sum_t (1/K) sum_k sg(R_{t,k}) log pi(a_{t,k} | s_t),   a_{t,k} ~ pi'(.|s_t),
    R_{t,k} = 1 if a_{t,k} = y*_t else beta

(1/T) is the recipe's aggregation (`seq_mean_token_mean` is the formula's per-sequence mean, `token_mean` the
batch-level one). Its expectation over the samples is
    -(1/T) sum_t [ pi'(y*_t) log pi(y*_t) + beta sum_{a != y*_t} pi'(a) log pi(a) ]
so with tau = 1 and beta = 0 it is DFT (-sg(p) log p, scale 1 with this 1/K) in expectation, value and gradient.
No sequence is generated: the candidates are drawn from the logits the forward pass already computed
(`ops.sample_tokens`, torch.multinomial over [chunk, V] rows with torch's global RNG, which accelerate checkpoints),
and log pi(a_k) is gathered by `ops.selective_log_softmax` with a [B, L, K] index, never a [B, L, K, V] tensor.

Confirmed (arXiv abstract/HTML page 2509.26313v1 and reviews of it, via search): each token is a single-step RL
trajectory; several candidates are sampled per position from the current policy; the gold token provides the reward;
a second term penalises probability on sampled incorrect tokens. UNVERIFIED (no official code was found, and the
stored paper text was not reachable past its abstract): the paper's equation number, K (256 reported in the
summaries, docs/provenance.md), tau (described there as > 1), beta (< 1, possibly slightly negative) and the
learning rate.
The defaults below follow those descriptions and must be checked against the paper before claiming a reproduction.
Searched again (2026-11-22: the stored pages and code corpora, arXiv HTML v1, paper-summary sites, a search for
an official repository): none reached the paper's experimental section, so K, tau and beta remain unverified.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import DEMO, Experience
from posttrain.objectives.base import ObjectiveConfig, register_objective, terms
from posttrain.ops.logprobs import sample_tokens, selective_log_softmax
from posttrain.ops.masked import masked_mean
from posttrain.policy import PolicyOutput


@dataclass(frozen=True)
class OTRConfig(ObjectiveConfig):
    """One-token rollouts at every demonstration position (defaults unverified against the paper)."""

    num_samples: int = field_doc(256, "K, candidate tokens sampled per position (256 reported; unverified)")
    temperature: float = field_doc(1.2, "tau, sampling temperature of pi' (described as > 1; value unverified)")
    beta: float = field_doc(-0.1, "reward of a sampled token that is not the demonstration's (< 1; value unverified)")

    def check(self) -> None:
        super().check()
        require(self.num_samples >= 1, "num_samples", f"must be >= 1, got {self.num_samples}")
        require(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        require(self.beta < 1, "beta", f"must be < 1 (the gold token's reward), got {self.beta}")


@register_objective("otr", OTRConfig)
class OTR:
    source = "demos"
    needs = frozenset({"logits"})   # logits: samples and scores K tokens from the full [B, L, V]

    def __init__(self, config: OTRConfig):
        self.config = config
        self.terms = terms(config.aggregation, DEMO)

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, float]]:
        c, y, mask = self.config, exp.targets, exp.target_mask                       # [B, L], [B, L]
        a = sample_tokens(out.logits, c.num_samples, c.temperature, mask)           # [B, L, K] a_k ~ pi'(.|s_t)
        hit = (a == y[..., None]).float()                                            # [B, L, K] 1[a_k = y*_t]
        reward = hit + c.beta * (1.0 - hit)                                          # [B, L, K] R_k (no grad)
        log_pi_a = selective_log_softmax(out.logits, a)                              # [B, L, K] log pi(a_k | s_t)
        loss = -(reward * log_pi_a).mean(-1)                                   # [B, L] -(1/K) sum_k R_k log pi(a_k)
        return loss, {"hit_rate": masked_mean(hit.mean(-1), mask), "nll": masked_mean(-out.logprobs, mask)}
