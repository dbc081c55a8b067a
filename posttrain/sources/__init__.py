"""Experience sources: demonstrations (sources/demos.py) and rollouts (sources/rollouts.py, with the demonstrations
and prefixes a hybrid objective puts inside its groups: sources/guidance.py)."""
from posttrain.sources.demos import DemoBuilder
from posttrain.sources.plan import RolloutPlan
from posttrain.sources.rollouts import Prompt, RolloutBuilder, check_world, rollout_prompts

__all__ = ["DemoBuilder", "Prompt", "RolloutBuilder", "RolloutPlan", "check_world", "rollout_prompts"]
