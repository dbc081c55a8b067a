"""The objectives registry. Importing this package registers every built-in objective."""
from posttrain.objectives.aggregation import AGGREGATIONS, Normalizer, aggregate
from posttrain.objectives.base import OBJECTIVES, ObjectiveConfig, build_objective, register_objective
from posttrain.objectives import sft  # noqa: F401  (registers "sft")
from posttrain.objectives import asft, dft, otr  # noqa: F401  (register "asft", "dft", "otr")
from posttrain.objectives import grpo, ppo  # noqa: F401  (register "grpo", "dr_grpo", "dapo", "ppo")
from posttrain.objectives import chord_phi, luffy, prefix_rft, srft, uft  # noqa: F401  (the hybrids)

__all__ = ["AGGREGATIONS", "Normalizer", "aggregate", "OBJECTIVES", "ObjectiveConfig", "build_objective",
           "register_objective"]
