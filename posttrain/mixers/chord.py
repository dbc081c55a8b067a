"""CHORD (Zhang et al., arXiv 2508.11408): one loss over rollouts and expert demonstrations,

    L(s) = (1 - mu(s)) L_GRPO + mu(s) L_SFT

with mu(s) a schedule of the stage step s. Followed: the authors' code (modelscope/Trinity-RFT,
trinity/algorithm/policy_loss_fn/chord_policy_loss.py and examples/mix_chord/mix_chord.yaml, read through the
search index at 0414330; docs/provenance.md): mu rises linearly from 0 to mu_peak over W warm-up steps, then follows
half a cosine to mu_valley over D steps and stays there:

    mu(s) = mu_peak s / W                                                 s < W
          = mu_valley + (mu_peak - mu_valley) (1 + cos(pi (s - W) / D)) / 2   W <= s <= W + D
          = mu_valley                                                     s > W + D

which is `Schedule(name=cosine, start=mu_peak, end=mu_valley, steps=D, warmup_steps=W)`. The authors' settings:
CHORD-mu W = 0, D = 200, 0.9 -> 0.05 with plain SFT (the default here); CHORD-phi a constant mu = 0.1 with the
SFT tokens weighted by sg(p (1 - p)) (objectives/chord_phi.py). Each term is a mean over its own tokens (the
trainer aggregates every objective over its own source with that source's normaliser), which is what the code's
per-type rescaling of micro-batch losses achieves. The GRPO term in their runs is dual-clip PPO (eps 0.2, c 3),
token-mean, no KL: set that on the RL objective (recipes/tiny/chord.yaml).

The learning rate of their runs lives in a file that was not read: UNVERIFIED.
"""
from __future__ import annotations

from dataclasses import dataclass

from posttrain.configlib import field_doc, require
from posttrain.mixers.base import MixerConfig, MixPlan, StepReport, register_mixer
from posttrain.schedules import Schedule, schedule_value


@dataclass(frozen=True)
class ChordConfig(MixerConfig):
    """L = (1 - mu) L_rl + mu L_sft, mu a schedule (CHORD-mu defaults: warm-up 0, cosine 0.9 -> 0.05 over 200 steps)."""

    mu: float | Schedule = field_doc(Schedule("cosine", start=0.9, end=0.05, steps=200),
                                     "mu(s): a number (constant, CHORD-phi: 0.1) or a schedule")
    rl: str = field_doc("grpo", "the stage objective weighted by 1 - mu")
    sft: str = field_doc("sft", "the stage objective weighted by mu")

    def check(self) -> None:
        lo, hi = self.mu.bounds() if isinstance(self.mu, Schedule) else (self.mu, self.mu)
        require(0.0 <= lo and hi <= 1.0, "mu", f"must stay within [0, 1], got values from {lo} to {hi}")
        require(self.rl != self.sft, "sft", f"must name another objective than rl ({self.rl!r})")

    def objective_names(self) -> list[str]:
        return [self.rl, self.sft]


@register_mixer("chord", ChordConfig)
class Chord:
    def __init__(self, config: ChordConfig, weights: dict[str, float], seed: int):
        self.config, self.weights = config, weights

    def mu(self, step: int) -> float:
        return schedule_value(self.config.mu, step)

    def plan(self, step: int) -> MixPlan:
        mu, c = self.mu(step), self.config
        return MixPlan(self.weights | {c.rl: (1.0 - mu) * self.weights[c.rl], c.sft: mu * self.weights[c.sft]})

    def observe(self, step: int, report: StepReport) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}                                 # the weights are logged as mix/<objective>

    def state_dict(self) -> dict:
        return {}                                 # mu is a function of the step alone

    def load_state_dict(self, state: dict) -> None:
        pass
