"""Rollout engines (a registry: `hf`, `vllm`, `vllm-server`)."""
from posttrain.rollout import hf  # noqa: F401  (registers the `hf` engine)
from posttrain.rollout.base import ENGINES, Completion, RolloutEngine, SamplingConfig, encode_prompts

__all__ = ["ENGINES", "Completion", "RolloutEngine", "SamplingConfig", "encode_prompts"]
