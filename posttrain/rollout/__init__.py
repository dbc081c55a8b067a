"""Rollout engines (a registry: `hf`, `vllm`, `vllm-server`)."""
from posttrain.rollout import hf  # noqa: F401  (registers the `hf` engine)
from posttrain.rollout import vllm_engine, vllm_server  # noqa: F401  (register `vllm`, `vllm-server`; vLLM is imported only when one is built)
from posttrain.rollout.base import ENGINE_REQUIREMENTS, ENGINES, Completion, RolloutEngine, SamplingConfig, encode_prompts

__all__ = ["ENGINES", "ENGINE_REQUIREMENTS", "Completion", "RolloutEngine", "SamplingConfig", "encode_prompts"]
