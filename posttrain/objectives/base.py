"""What an objective is: a typed config, a `needs` set, and a call returning a per-token loss and metrics."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import Experience
from posttrain.objectives.aggregation import AGGREGATIONS
from posttrain.policy import PolicyOutput
from posttrain.registry import Registry


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings every objective has; each objective's own config adds its fields."""

    type: str = field_doc("", "registered objective name (defaults to the key under `objectives:`)")
    aggregation: str = field_doc("token_mean", "named loss aggregation: token_mean, seq_mean_token_mean, seq_mean_token_sum_norm")

    def check(self) -> None:
        require(self.aggregation in AGGREGATIONS, "aggregation",
                f"got {self.aggregation!r}; allowed: {', '.join(AGGREGATIONS.names())}")


class Objective(Protocol):
    needs: frozenset[str]   # what the trainer must provide: "demos", "rollouts", "reference", "ref_logits", "values";
                            # what the policy pass computes besides log-probs: "logits" (the full [B, L, V]; else
                            # PolicyOutput.logits is None), "entropy" (PolicyOutput.entropy)
    config: ObjectiveConfig

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor, dict[str, float]]:
        """Per-token loss [B, L] (masked later by the aggregation) and scalar metrics."""
        ...


@dataclass(frozen=True)
class ObjectiveEntry:
    name: str
    config_cls: type
    factory: Callable[[ObjectiveConfig], Objective]


OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective")


def register_objective(name: str, config_cls: type) -> Callable:
    """Class decorator: `@register_objective("sft", SFTConfig)` on a class built from its config."""

    def wrap(factory: Callable) -> Callable:
        OBJECTIVES.register(name, ObjectiveEntry(name, config_cls, factory))
        return factory

    return wrap


def build_objective(cfg: ObjectiveConfig) -> Objective:
    return OBJECTIVES.get(cfg.type).factory(cfg)
