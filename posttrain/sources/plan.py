"""The contract between a rollout objective and the rollout builder: what the objective asks of its experience.

Each rollout objective states its plan (`rollout_plan()`); the builder follows it and never reads the objective's
config. A stage's rollout objectives must state equal plans (config.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass

from posttrain.rl.advantages import AdvantageParams
from posttrain.sources.guidance import HintSampling, PrefixSampling


@dataclass(frozen=True)
class RolloutPlan:
    """What a rollout objective asks of its experience; each objective states it (`rollout_plan()`)."""

    estimator: str              # advantage estimator (rl/advantages.py registry)
    params: AdvantageParams
    kl_beta: float = 0.0        # beta of the KL penalty in the reward (0 = none there)
    kl_estimator: str = "k1"
    reference: bool = False     # reference log-probs are needed (a KL term in the loss or in the reward)
    values: bool = False        # PPO: old values from the value head, GAE returns
    dynamic_sampling: bool = False
    max_rounds: int = 1         # generation rounds per step (1 without dynamic sampling)
    demos_in_group: int = 0     # LUFFY: the demonstration as this many more members of each group (0 or 1)
    prefixes: PrefixSampling | None = None   # Prefix-RFT
    hints: HintSampling | None = None        # UFT

    @property
    def reads_demos(self) -> bool:
        """Whether rows need the data set's demonstrations."""
        return bool(self.demos_in_group or self.prefixes or self.hints)
