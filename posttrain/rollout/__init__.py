"""Rollout engines (a registry: `hf`, `vllm`, `vllm-server`)."""
from posttrain.rollout.base import ENGINES, Completion, RolloutEngine, SamplingConfig

__all__ = ["ENGINES", "Completion", "RolloutEngine", "SamplingConfig"]
