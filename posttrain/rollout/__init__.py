"""Rollout engines (a registry: `hf`, `vllm`, `vllm-server`)."""
from posttrain.rollout import (  # noqa: F401  (register `vllm`, `vllm-server`; vLLM is imported only when one is built)
    hf,  # noqa: F401  (registers the `hf` engine)
    vllm_engine,
    vllm_server,
)
from posttrain.rollout.base import (
    ENGINE_REQUIREMENTS,
    ENGINES,
    Completion,
    RolloutEngine,
    SamplingConfig,
    encode_prompts,
)

__all__ = ["ENGINES", "ENGINE_REQUIREMENTS", "Completion", "RolloutEngine", "SamplingConfig", "encode_prompts"]
