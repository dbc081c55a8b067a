"""The `rollout:` section of a recipe: which engine samples, how, and how one rollout batch is turned into updates.

    rollout:
      engine: hf                          # a registered rollout engine (posttrain/rollout: hf, vllm, vllm-server)
      engine_args: {batch_size: 64}       # that engine's own typed settings (e.g. rollout/hf.py HFEngineConfig)
      sampling: {n: 8, temperature: 1.0, max_new_tokens: 256}   # SamplingConfig; n = the group size G
      prompts_per_step: 64                # global prompts per rollout batch (all processes)
      num_iterations: 1                   # passes (updates) over each rollout batch
      mini_batch_size: null               # completions per optimizer step, global (null = the whole batch)

One stage step = one rollout batch of prompts_per_step * n completions, then num_iterations passes over its
mini-batches, one optimizer step each: (prompts_per_step * n / mini_batch_size) * num_iterations optimizer steps.
The `rewards:` list (posttrain/rewarding/spec.py RewardSpec) scores the completions. Both sections are top-level
defaults a stage may override (`rollout` deep-merged, `rewards` replaced).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from posttrain.configlib import field_doc, require
from posttrain.rollout.base import SamplingConfig


@dataclass(frozen=True)
class RolloutConfig:
    """Sampling completions from the policy and turning each rollout batch into optimizer steps."""

    engine: str = field_doc("hf", "rollout engine: a registered name (hf, vllm, vllm-server)")
    engine_args: dict[str, Any] = field_doc(factory=dict, doc="the engine's own settings, checked by the engine when "
                                            "the stage starts (hf: batch_size, zero3_gather; rollout/hf.py)")
    sampling: SamplingConfig = field_doc(factory=SamplingConfig, doc="n (group size G), temperature, top_p, top_k, "
                                         "max_new_tokens, stop, seed. seed null: each process draws from a stream "
                                         "derived from the recipe seed, the data position and its rank (batched, exact "
                                         "on resume); seed set: every prompt draws from its own stream derived from "
                                         "the seed and the prompt's global position, so any number of processes "
                                         "samples the same completions (one generate call per prompt: slower)")
    prompts_per_step: int = field_doc(64, "prompts per rollout batch over all processes (a multiple of the number of "
                                          "processes); each gets sampling.n completions")
    num_iterations: int = field_doc(1, "passes over each rollout batch (PPO epochs; mu in GRPO); > 1 reuses the batch, "
                                       "so pi_old is recomputed by teacher forcing")
    mini_batch_size: int | None = field_doc(None, "completions per optimizer step over all processes (null = the "
                                                   "whole rollout batch, one optimizer step per pass)")
    mask_truncated: bool = field_doc(False, "overlong filtering (DAPO): completions cut at max_new_tokens carry no "
                                            "loss; their rewards still count in the group baselines")

    @property
    def completions_per_step(self) -> int:
        return self.prompts_per_step * self.sampling.n

    @property
    def updates_per_step(self) -> int:
        """Optimizer steps per rollout batch."""
        return self.num_iterations * (self.completions_per_step // (self.mini_batch_size or self.completions_per_step))

    def check(self) -> None:
        from posttrain.rollout import ENGINES

        require(self.engine in ENGINES, "engine", f"unknown rollout engine {self.engine!r}; registered: "
                                                  f"{', '.join(ENGINES.names())}")
        require(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        require(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        total = self.completions_per_step
        require(self.mini_batch_size is None or (self.mini_batch_size >= 1 and total % self.mini_batch_size == 0),
                "mini_batch_size", f"must divide the rollout batch (prompts_per_step * sampling.n = {total}), "
                                   f"got {self.mini_batch_size}")
