"""What a mixer is: the owner of the objectives' weights over a stage.

Before each stage step the trainer asks `plan(step)` for the weight of every objective of the stage; a source
(demonstrations, rollouts) that no objective with a non-zero weight reads is not built that step. After the step it
reports the step's metrics (reduced over processes) with `observe(step, metrics)`. `state_dict()` goes into every
checkpoint (plain JSON data, including any RNG state), so a resumed run plans exactly as the uninterrupted one.

A mixer is built from its typed config (`stage.mixer:`), the stage's objective weights (`stage.objectives:`) and a
seed derived from the recipe seed and the stage index. `constant` (mixers/constant.py) returns the stage's weights at
every step and is the default.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from posttrain.configlib import field_doc
from posttrain.registry import Registry


@dataclass(frozen=True)
class MixerConfig:
    """Settings every mixer has; each mixer's own config adds its fields."""

    name: str = field_doc("constant", "registered mixer (posttrain list)")

    def objective_names(self) -> list[str]:
        """Names of the stage objectives this mixer refers to (checked against the stage's `objectives:`)."""
        return []


class Mixer(Protocol):
    config: MixerConfig

    def plan(self, step: int) -> dict[str, float]:
        """Objective name -> weight for stage step `step` (0-based), for every objective of the stage."""
        ...

    def observe(self, step: int, metrics: dict[str, float]) -> None:
        """The metrics of step `step`, the same on every process."""
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
        missing = [m for m in ("plan", "observe", "state_dict", "load_state_dict") if not callable(getattr(factory, m, None))]
        if missing:
            raise TypeError(f"mixer {name!r} ({factory.__qualname__}) lacks {', '.join(missing)}")
        MIXERS.register(name, MixerEntry(name, config_cls, factory))
        return factory

    return wrap


def build_mixer(config: MixerConfig, weights: dict[str, float], seed: int) -> Mixer:
    return MIXERS.get(config.name).factory(config, dict(weights), seed)
