"""What a mixer is: the owner of the objectives' weights over a stage.

Before each stage step the trainer asks `plan(step)` for a MixPlan: the weight of every objective of the stage (a
source, demonstrations or rollouts, that no objective with a non-zero weight reads is not built that step), and
optionally which demonstration rows to train on (ReLIFT's buffer) and which extra measurements to take before the
update (AMFT's meta-gradient). After the step it reports a StepReport: the step's metrics (reduced over processes,
the same on every process), the outcome of every rollout group and the measurements asked for. `state_dict()` goes
into every checkpoint (plain JSON data, including any RNG state), so a resumed run plans exactly as the
uninterrupted one.

A mixer is built from its typed config (`stage.mixer:`), the stage's objective weights (`stage.objectives:`) and a
seed derived from the recipe seed and the stage index. `constant` (mixers/constant.py) returns the stage's weights at
every step and is the default.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

from posttrain.configlib import field_doc
from posttrain.experience import GroupOutcome
from posttrain.registry import Registry


@dataclass(frozen=True)
class MixerConfig:
    """Settings every mixer has; each mixer's own config adds its fields."""

    name: str = field_doc("constant", "registered mixer (posttrain list)")

    def objective_names(self) -> list[str]:
        """Names of the stage objectives this mixer refers to (checked against the stage's `objectives:`)."""
        return []

    def needs_validation(self) -> bool:
        """Whether the mixer asks for meta-gradients (the stage's eval data then holds the held-out demonstrations)."""
        return False


@dataclass(frozen=True)
class MixPlan:
    """What a mixer decides for one stage step."""

    weights: dict[str, float]                     # objective name -> weight, every objective of the stage
    demo_rows: tuple[int, ...] | None = None      # demonstration rows (data set indices) to train on; None = the
                                                  # demonstration source's own order (train.batch_size rows)
    meta_gradient: str | None = None              # a demonstration objective: report <grad L_val, grad L_k> for
                                                  # each weighted objective k, L_val that objective's loss on
                                                  # held-out demonstrations (the stage's eval data), before the update


@dataclass
class StepReport:
    """What the trainer tells the mixer after a step (identical on every process)."""

    metrics: dict[str, float]
    groups: list[GroupOutcome] = field(default_factory=list)   # every process's groups, in process order
    val_dots: dict[str, float] = field(default_factory=dict)   # objective -> <grad L_val, grad L_k> when asked


class Mixer(Protocol):
    config: MixerConfig

    def plan(self, step: int) -> MixPlan:
        """The plan for stage step `step` (0-based)."""
        ...

    def observe(self, step: int, report: StepReport) -> None:
        """What step `step` measured."""
        ...

    def metrics(self) -> dict[str, float]:
        """The mixer's own state to log after each step (e.g. mix/mu, mix/sft_probability, buffer size)."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


@dataclass(frozen=True)
class MixerEntry:
    name: str
    config_cls: type
    factory: Callable[[MixerConfig, dict[str, float], int], Mixer]


MIXERS: Registry[MixerEntry] = Registry("mixer")


def register_mixer(name: str, config_cls: type) -> Callable:
    """Class decorator: `@register_mixer("chord", ChordConfig)` on a class built as cls(config, weights, seed)."""
    if not (isinstance(config_cls, type) and issubclass(config_cls, MixerConfig)):
        raise TypeError(f"mixer {name!r}: its config must subclass MixerConfig, got {config_cls!r}")

    def wrap(factory: type) -> type:
        missing = [m for m in ("plan", "observe", "metrics", "state_dict", "load_state_dict")
                   if not callable(getattr(factory, m, None))]
        if missing:
            raise TypeError(f"mixer {name!r} ({factory.__qualname__}) lacks {', '.join(missing)}")
        MIXERS.register(name, MixerEntry(name, config_cls, factory))
        return factory

    return wrap


def build_mixer(config: MixerConfig, weights: dict[str, float], seed: int) -> Mixer:
    return MIXERS.get(config.name).factory(config, dict(weights), seed)
