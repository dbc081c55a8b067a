"""The objectives registry. Importing this package registers every built-in objective."""
from posttrain.objectives import (  # noqa: F401  (register "asft", "dft", "otr")  # noqa: F401  (register "grpo", "dr_grpo", "dapo", "ppo")  # noqa: F401  (the hybrids)
           asft,
           chord_phi,
           dft,
           grpo,
           luffy,
           otr,
           ppo,
           prefix_rft,
           sft,  # noqa: F401  (registers "sft")
           srft,
           uft,
)
from posttrain.objectives.aggregation import AGGREGATIONS, Normalizer, aggregate
from posttrain.objectives.base import OBJECTIVES, ObjectiveConfig, build_objective, register_objective

__all__ = ["AGGREGATIONS", "Normalizer", "aggregate", "OBJECTIVES", "ObjectiveConfig", "build_objective",
           "register_objective"]
