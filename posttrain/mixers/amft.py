"""AMFT — adaptive meta fine-tuning (He et al., arXiv 2508.06944; WITHDRAWN by its authors): one loss

    L = (1 - mu) L_RL + mu L_SFT

with mu moved by a controller after an SFT warm-up. What was taken from where (docs/provenance.md):
- the paper (withdrawn; its arXiv v3 comment cites "concerns of potential academic misconduct") for the form of L and
  the two signals; nothing of its reported results is relied on;
- the public code (TSYJ-He/AMFT@0e030f4, src/trainer/adaptive_weight_controller.py, configs/main_config.yaml; its RL
  branch returns random tensors, so no RL was taken from it) for the controller and its settings: mu_0 0.8, range
  [0.05, 0.95], eta_H 5e-4, eta_m 1e-4, a meta-gradient every 20 steps, a 50-step SFT warm-up after which the entropy
  target H* is the mean token entropy of <= 20 SFT batches;
- the sign of the meta-gradient step from the algebra, not the code. A one-step look-ahead
  theta' = theta - alpha [(1 - mu) g_RL + mu g_SFT] gives

      dL_val(theta') / dmu = -alpha < grad L_val, g_SFT - g_RL >

  and the code ADDS that to mu, which ascends the validation loss (docs/provenance.md). Here mu descends it:

      warm-up (W steps):  mu = 1 (SFT only); H* = mean sft/entropy of the last `target_steps` warm-up steps
      then, each step:    mu <- clip( mu + eta_H (H* - H_t) - eta_m dL_val/dmu, mu_min, mu_max )
                          H_t the RL objective's token entropy (`entropy`) of its last rollout batch; dL_val/dmu from
                          a meta-gradient step (every `meta_every` steps, on a batch of the stage's eval data: held-out
                          demonstrations, L_val = the SFT objective on them), 0 otherwise

The entropy term keeps the code's sign (mu rises, i.e. more SFT, when the entropy falls below the target). Deviations:
mu moves after a step from that step's signals and applies from the next one (the code updates it inside the step);
H* is measured over the demonstration (completion) tokens, the code's mask includes the prompt; the meta-gradient
needs the gradients as plain tensors, so it is refused under DeepSpeed.
"""
from __future__ import annotations

from dataclasses import dataclass

from posttrain.configlib import field_doc, require
from posttrain.mixers.base import MixerConfig, MixPlan, StepReport, register_mixer


@dataclass(frozen=True)
class AMFTConfig(MixerConfig):
    """L = (1 - mu) L_rl + mu L_sft, mu from an entropy controller and a meta-gradient (authors' code settings)."""

    sft: str = field_doc("sft", "the stage objective weighted by mu (log its entropy: sft {entropy_metric: true})")
    rl: str = field_doc("grpo", "the stage objective weighted by 1 - mu (its `entropy` metric is H_t)")
    mu_init: float = field_doc(0.8, "mu after the warm-up (authors' config: 0.8)")
    mu_min: float = field_doc(0.05, "lower clip of mu")
    mu_max: float = field_doc(0.95, "upper clip of mu")
    warmup_steps: int = field_doc(50, "W: SFT-only steps at the start of the stage (authors: 50)")
    target_steps: int = field_doc(20, "the entropy target H* is the mean SFT entropy of the last this many warm-up "
                                      "steps")
    entropy_lr: float = field_doc(5e-4, "eta_H of the entropy term (0 = off)")
    meta_lr: float = field_doc(1e-4, "eta_m of the meta-gradient term (0 = off)")
    meta_every: int = field_doc(20, "a meta-gradient step every this many steps after the warm-up")

    def check(self) -> None:
        require(0 <= self.mu_min <= self.mu_init <= self.mu_max <= 1, "mu_init",
                f"need 0 <= mu_min <= mu_init <= mu_max <= 1, got {self.mu_min}, {self.mu_init}, {self.mu_max}")
        require(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        require(self.target_steps >= 1, "target_steps", f"must be >= 1, got {self.target_steps}")
        require(self.entropy_lr == 0 or self.warmup_steps >= 1, "warmup_steps",
                "the entropy term needs a warm-up to measure its target (warmup_steps >= 1, or entropy_lr: 0)")
        require(self.meta_every >= 1, "meta_every", f"must be >= 1, got {self.meta_every}")
        require(self.rl != self.sft, "sft", f"must name another objective than rl ({self.rl!r})")

    def objective_names(self) -> list[str]:
        return [self.sft, self.rl]

    def needs_validation(self) -> bool:
        return self.meta_lr > 0


def meta_derivative(lr: float, dot_sft: float, dot_rl: float) -> float:
    """dL_val / dmu = -alpha <grad L_val, g_SFT - g_RL>, for the one-step look-ahead
    theta' = theta - alpha [(1 - mu) g_RL + mu g_SFT]."""
    return -lr * (dot_sft - dot_rl)


@register_mixer("amft", AMFTConfig)
class AMFT:
    def __init__(self, config: AMFTConfig, weights: dict[str, float], seed: int):
        self.config, self.weights = config, weights
        self.mu = config.mu_init
        self.target: float | None = None            # H*
        self.warmup_entropy: list[float] = []       # sft/entropy of the last warm-up steps
        self.meta = 0.0                             # the last dL_val / dmu

    def plan(self, step: int) -> MixPlan:
        c = self.config
        if step < c.warmup_steps:
            return MixPlan(self.weights | {c.rl: 0.0, c.sft: self.weights[c.sft]})
        meta = c.sft if c.meta_lr > 0 and (step - c.warmup_steps) % c.meta_every == 0 else None
        return MixPlan(self.weights | {c.rl: (1 - self.mu) * self.weights[c.rl], c.sft: self.mu * self.weights[c.sft]},
                       meta_gradient=meta)

    def observe(self, step: int, report: StepReport) -> None:
        c, m = self.config, report.metrics
        if step < c.warmup_steps:
            if c.entropy_lr:
                key = f"{c.sft}/entropy"
                if key not in m:
                    raise ValueError(f"mixer 'amft' measures its entropy target on {key!r}; set objectives.{c.sft}."
                                     "entropy_metric: true")
                self.warmup_entropy = (self.warmup_entropy + [m[key]])[-c.target_steps:]
                if step == c.warmup_steps - 1:
                    self.target = sum(self.warmup_entropy) / len(self.warmup_entropy)   # H*
            return
        mu = self.mu
        if c.entropy_lr:
            if "entropy" not in m:
                raise ValueError(f"mixer 'amft' reads the RL entropy H_t from objective {c.rl!r}'s `entropy` metric; "
                                 "keep its entropy_metric on")
            mu += c.entropy_lr * (self.target - m["entropy"])                       # + eta_H (H* - H_t)
        if report.val_dots:
            self.meta = meta_derivative(m["lr"], report.val_dots[c.sft], report.val_dots[c.rl])
            mu -= c.meta_lr * self.meta                                             # descend L_val
        self.mu = min(max(mu, c.mu_min), c.mu_max)

    def metrics(self) -> dict[str, float]:
        return {"mix/mu": self.mu, "mix/entropy_target": self.target or 0.0, "mix/meta_derivative": self.meta}

    def state_dict(self) -> dict:
        return {"mu": self.mu, "target": self.target, "warmup_entropy": self.warmup_entropy, "meta": self.meta}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.mu, self.target, self.meta = state["mu"], state["target"], state["meta"]
            self.warmup_entropy = list(state["warmup_entropy"])
