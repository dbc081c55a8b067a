"""What an objective is: a typed config, the source it reads, its loss terms, and a call returning per-token losses.

The contract the trainer relies on (checked at registration and when the objective is built, never guessed):

    source   "demos" or "rollouts": the experience it reads. Demonstrations are teacher-forced at temperature 1;
             rollouts at the rollout's sampling temperature. A rollout objective also states its `rollout_plan()`
             (sources/rollouts.py RolloutPlan: advantage estimator, KL placement, dynamic sampling, demonstrations
             or prefixes inside the groups), which the rollout builder follows.
    needs    extra inputs from the trainer: "reference" (pi_ref log-probs of the targets), "ref_logits"
             (pi_ref's logits: full-vocabulary terms), "values" (a value head: PPO); and what the policy pass computes
             besides log-probs: "logits" (the full [B, L, V]; else PolicyOutput.logits is None: the vocabulary-scale
             path never materialises them), "entropy" (PolicyOutput.entropy, differentiable).
    terms    name -> Term(tokens, aggregation): each term of the loss is aggregated over the tokens of its source
             whose provenance (experience.PROMPT / DEMO / PREFIX / POLICY) is in `tokens`, with the global normaliser
             of exactly those tokens, by the named aggregation. An objective with one term returns its per-token loss
             [B, L] as a tensor; one with several returns {term: [B, L]}. A term carries its own coefficient inside
             the objective (e.g. LUFFY's -0.001 entropy bonus); the mixer's weight multiplies the objective's sum.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal, Protocol

from torch import Tensor

from posttrain.configlib import field_doc, require
from posttrain.experience import DEMO, POLICY, PREFIX, Experience
from posttrain.objectives.aggregation import AGGREGATIONS
from posttrain.policy import PolicyOutput
from posttrain.registry import Registry

SOURCES = ("demos", "rollouts")
NEEDS = frozenset({"reference", "ref_logits", "values", "logits", "entropy"})


@dataclass(frozen=True)
class ObjectiveConfig:
    """Settings every objective has; each objective's own config adds its fields."""

    type: str = field_doc("", "registered objective name (defaults to the key under `objectives:`)")
    aggregation: str = field_doc("token_mean", "named loss aggregation: token_mean, seq_mean_token_mean, "
                                               "seq_mean_token_sum_norm")

    def check(self) -> None:
        require(self.aggregation in AGGREGATIONS, "aggregation",
                f"got {self.aggregation!r}; allowed: {', '.join(AGGREGATIONS.names())}")


def redefault(base: type, name: str, default):
    """A field of config class `base` with another default, keeping its documentation (for configs that extend
    another objective's: Dr. GRPO, PPO, LUFFY, ...)."""
    return dataclasses.field(default=default, metadata=base.__dataclass_fields__[name].metadata)


@dataclass(frozen=True)
class Term:
    """One aggregated part of an objective's loss."""

    tokens: frozenset[int]   # provenance of the tokens it is aggregated over (experience.DEMO, PREFIX, POLICY)
    aggregation: str         # a registered aggregation (objectives/aggregation.py)


def terms(aggregation: str, *kinds: int, **extra: Term) -> dict[str, Term]:
    """{"loss": Term(kinds, aggregation), **extra}: the usual declaration of an objective's terms."""
    return {"loss": Term(frozenset(kinds), aggregation), **extra}


class Objective(Protocol):
    source: Literal["demos", "rollouts"]
    needs: frozenset[str]
    terms: dict[str, Term]
    config: ObjectiveConfig

    def __call__(self, out: PolicyOutput, exp: Experience) -> tuple[Tensor | dict[str, Tensor], dict]:
        """Per-token loss [B, L] (or {term: [B, L]}; masked and aggregated by the trainer) and scalar metrics."""
        ...


@dataclass(frozen=True)
class ObjectiveEntry:
    name: str
    config_cls: type
    factory: Callable[[ObjectiveConfig], Objective]


OBJECTIVES: Registry[ObjectiveEntry] = Registry("objective")


def register_objective(name: str, config_cls: type) -> Callable:
    """Class decorator: `@register_objective("sft", SFTConfig)` on a class built from its config. The class states
    its `source` ("demos" or "rollouts"); a rollout objective also has a `rollout_plan()` method."""

    def wrap(factory: type) -> type:
        where = f"objective {name!r} ({factory.__qualname__})"
        if not (isinstance(config_cls, type) and issubclass(config_cls, ObjectiveConfig)):
            raise TypeError(f"{where}: its config must subclass ObjectiveConfig, got {config_cls!r}")
        source = getattr(factory, "source", None)
        if source not in SOURCES:
            raise TypeError(f"{where}: class attribute `source` must be one of {', '.join(SOURCES)}, got {source!r}")
        if source == "rollouts" and not callable(getattr(factory, "rollout_plan", None)):
            raise TypeError(f"{where} reads rollouts and must define rollout_plan() (sources/rollouts.py RolloutPlan)")
        OBJECTIVES.register(name, ObjectiveEntry(name, config_cls, factory))
        return factory

    return wrap


def build_objective(cfg: ObjectiveConfig) -> Objective:
    """The objective of `cfg`, with its `needs` and `terms` checked."""
    objective = OBJECTIVES.get(cfg.type).factory(cfg)
    where = f"objective {cfg.type!r}"
    unknown = set(objective.needs) - NEEDS
    if unknown:
        raise TypeError(f"{where}: unknown needs {sorted(unknown)}; allowed: {', '.join(sorted(NEEDS))}")
    if not objective.terms:
        raise TypeError(f"{where}: declares no loss terms")
    for term_name, term in objective.terms.items():
        if not term.tokens or not set(term.tokens) <= {DEMO, PREFIX, POLICY}:
            raise TypeError(f"{where}: term {term_name!r} must read DEMO / PREFIX / POLICY tokens, got {term.tokens}")
        if term.aggregation not in AGGREGATIONS:
            raise TypeError(f"{where}: term {term_name!r}: unknown aggregation {term.aggregation!r}")
    return objective
