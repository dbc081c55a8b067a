"""The objectives registry. Importing this package registers every built-in objective."""
from posttrain.objectives.aggregation import AGGREGATIONS, Normalizer, aggregate
from posttrain.objectives.base import OBJECTIVES, ObjectiveConfig, build_objective, register_objective
from posttrain.objectives import sft  # noqa: F401  (registers "sft")

__all__ = ["AGGREGATIONS", "Normalizer", "aggregate", "OBJECTIVES", "ObjectiveConfig", "build_objective",
           "register_objective"]
