"""constant: the stage's `objectives:` weights at every step (the default mixer)."""
from __future__ import annotations

from dataclasses import dataclass

from posttrain.mixers.base import MixerConfig, MixPlan, StepReport, register_mixer


@dataclass(frozen=True)
class ConstantConfig(MixerConfig):
    """The weights written under the stage's `objectives:`, unchanged."""


@register_mixer("constant", ConstantConfig)
class Constant:
    def __init__(self, config: ConstantConfig, weights: dict[str, float], seed: int):
        self.config, self.weights = config, weights

    def plan(self, step: int) -> MixPlan:
        return MixPlan(dict(self.weights))

    def observe(self, step: int, report: StepReport) -> None:
        pass

    def metrics(self) -> dict[str, float]:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
