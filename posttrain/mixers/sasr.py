"""SASR — step-wise adaptive integration of SFT and RL (Chen et al., arXiv 2505.13026): an SFT warm-up, then every
step is either an SFT step or a GRPO step, drawn at random with a probability that follows the model's state.

What is known (the abstract, v2 and v3; docs/provenance.md): the warm-up records the SFT gradient norm; the hybrid
phase "monitors gradient norms and divergence from the initial distribution" with a hyperparameter gamma to choose
between SFT and GRPO step by step; the GRPO branch splits tokens at the median advantage (G+ / G-: a review of the
paper; `median_split` on the GRPO objective). The paper's Algorithm 1 is UNVERIFIED: its code is not public and its
full text was not reachable. The rule below is THIS PROJECT'S READING of that description, not a reproduction:

    W warm-up steps: SFT only; G_warmup = ||grad L_SFT|| of the last warm-up step
    then, at step t:   rho_t = mean of the last `window` SFT-step gradient norms / G_warmup
                       D_t   = the RL objective's KL estimate to the stage's initial policy at its last step (`kl`)
                       p_t   = p_min + (p_max - p_min) sigmoid( gamma log rho_t + kappa D_t + b )
                       SFT with probability p_t (u_t < p_t, u_t ~ U[0, 1) from the mixer's own seeded RNG), else GRPO

The reading: a growing SFT gradient (the model drifting from the demonstrations) and a growing divergence from the
initial policy both call for more SFT; an SFT gradient at or below its warm-up level leaves the step to GRPO with
probability 1 - sigmoid(b) (1/2 by default). p_t is increasing in rho_t (gamma > 0); p_min = p_max = 1 gives pure
SFT and p_min = p_max = 0 pure GRPO. Every parameter is a recipe setting. A step that does not train the RL objective
does not generate. The state (G_warmup, the recent norms, the last KL, the RNG) is checkpointed.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

from posttrain.configlib import field_doc, require
from posttrain.mixers.base import MixerConfig, MixPlan, StepReport, register_mixer


@dataclass(frozen=True)
class SASRConfig(MixerConfig):
    """SFT warm-up, then each step SFT with probability p_t (this project's reading of SASR; UNVERIFIED)."""

    sft: str = field_doc("sft", "the stage objective of the SFT steps")
    rl: str = field_doc("grpo", "the stage objective of the RL (GRPO) steps")
    warmup_steps: int = field_doc(10, "W: SFT-only steps at the start of the stage; the last one's gradient norm is "
                                      "G_warmup")
    gamma: float = field_doc(2.0, "gamma > 0: slope of the step probability in log(||grad L_SFT|| / G_warmup)")
    kl_coef: float = field_doc(0.0, "kappa: weight of the divergence from the initial policy (the RL objective's `kl` "
                                    "metric: it needs a KL term, e.g. grpo beta > 0; 0 = unused)")
    bias: float = field_doc(0.0, "b: logit of the SFT probability when the gradient norm equals G_warmup and KL = 0")
    min_probability: float = field_doc(0.0, "p_min: floor of the SFT probability")
    max_probability: float = field_doc(1.0, "p_max: ceiling of the SFT probability")
    window: int = field_doc(1, "SFT-step gradient norms averaged into ||grad L_SFT|| (1 = the last one)")

    def check(self) -> None:
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        require(0 <= self.min_probability <= self.max_probability <= 1, "max_probability",
                f"need 0 <= min_probability <= max_probability <= 1, got {self.min_probability}, "
                f"{self.max_probability}")
        require(self.window >= 1, "window", f"must be >= 1, got {self.window}")
        require(self.rl != self.sft, "sft", f"must name another objective than rl ({self.rl!r})")

    def objective_names(self) -> list[str]:
        return [self.sft, self.rl]


def sft_probability(c: SASRConfig, ratio: float, kl: float) -> float:
    """p = p_min + (p_max - p_min) sigmoid(gamma log ratio + kappa kl + b)."""
    z = c.gamma * math.log(max(ratio, 1e-12)) + c.kl_coef * kl + c.bias
    return c.min_probability + (c.max_probability - c.min_probability) / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))


@register_mixer("sasr", SASRConfig)
class SASR:
    def __init__(self, config: SASRConfig, weights: dict[str, float], seed: int):
        self.config, self.weights = config, weights
        self.rng = random.Random(seed)
        self.warmup_norm: float | None = None       # G_warmup
        self.norms: list[float] = []                # recent SFT-step gradient norms
        self.kl = 0.0                               # the last RL step's KL to the initial policy
        self.probability = 1.0                      # p of the step being planned
        self.sft_steps = self.steps = 0

    def plan(self, step: int) -> MixPlan:
        c = self.config
        if step < c.warmup_steps:
            self.probability = 1.0
        else:
            ratio = sum(self.norms) / len(self.norms) / self.warmup_norm if self.norms and self.warmup_norm else 1.0
            self.probability = sft_probability(c, ratio, self.kl)
        sft = self.rng.random() < self.probability if step >= c.warmup_steps else True
        self.steps, self.sft_steps = self.steps + 1, self.sft_steps + sft
        return MixPlan(self.weights | {c.sft: self.weights[c.sft] if sft else 0.0,
                                       c.rl: 0.0 if sft else self.weights[c.rl]})

    def observe(self, step: int, report: StepReport) -> None:
        c, m = self.config, report.metrics
        if f"loss/{c.rl}" in m:                                          # an RL step
            if c.kl_coef and "kl" not in m:
                raise ValueError(f"mixer 'sasr': kl_coef is {c.kl_coef} but objective {c.rl!r} logs no `kl`; give it "
                                 "a KL term (e.g. beta > 0) or set kl_coef: 0")
            self.kl = m.get("kl", 0.0)
            return
        if step == c.warmup_steps - 1 or (self.warmup_norm is None and step >= c.warmup_steps):
            self.warmup_norm = m["grad_norm"]                           # G_warmup (or the first SFT step's, W = 0)
        if step >= c.warmup_steps:
            self.norms = (self.norms + [m["grad_norm"]])[-c.window:]

    def metrics(self) -> dict[str, float]:
        return {"mix/sft_probability": self.probability, "mix/sft_fraction": self.sft_steps / max(self.steps, 1),
                "mix/warmup_grad_norm": self.warmup_norm or 0.0}

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"rng": [version, list(internal), gauss], "warmup_norm": self.warmup_norm, "norms": self.norms,
                "kl": self.kl, "sft_steps": self.sft_steps, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.warmup_norm, self.norms, self.kl = state["warmup_norm"], list(state["norms"]), state["kl"]
        self.sft_steps, self.steps = state["sft_steps"], state["steps"]
