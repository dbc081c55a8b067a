"""ReLIFT — reinforcement learning interleaved with fine-tuning (Ma et al., arXiv 2506.07527):

    each RL step:   every prompt whose G sampled rollouts all fail (reward <= threshold) puts its row in a buffer
    when the buffer holds N rows:   the next step is an SFT step on the oldest N rows' demonstrations (no rollouts)

Followed: the authors' code (TheRoadQaQ/ReLIFT@eb95454, relift/verl/verl/relift/; docs/provenance.md):
the buffer of failed prompts (trainer.py L436-452: one item per prompt whose 8 rollouts all fail), the SFT pass on the
oldest `sft_data_size` items once the buffer holds them (L514-533), its loss token-mean NLL - 0.001 H (the `sft`
objective with entropy_coef 0.001), the RL side LUFFY-style GRPO without std or clip, Dr. GRPO's normaliser (the
`luffy` objective with demos_in_group 0). Deviations: the SFT update is a stage step of its own (the code runs it
right after the RL update of the same iteration: the same sequence of updates) and uses the stage's optimizer (the
code keeps a separate one with the same lr 1e-6); buffer_size rows are split evenly over the processes (a remainder
that does not split is left out of that update). The buffer is checkpointed.
"""
from __future__ import annotations

from dataclasses import dataclass

from posttrain.configlib import field_doc, require
from posttrain.mixers.base import MixerConfig, MixPlan, StepReport, register_mixer


@dataclass(frozen=True)
class ReLIFTConfig(MixerConfig):
    """RL steps, and an SFT step on the demonstrations of the prompts RL failed on once N of them are collected."""

    rl: str = field_doc("grpo", "the stage objective of the RL steps")
    sft: str = field_doc("sft", "the stage objective of the SFT steps (on the buffered rows' demonstrations)")
    buffer_size: int = field_doc(128, "N: rows per SFT step (authors' script: 128; their yaml: 32); -1 = never "
                                      "(pure RL)")
    threshold: float = field_doc(0.0, "a group fails when every sampled rollout's reward is <= this")

    def check(self) -> None:
        require(self.buffer_size == -1 or self.buffer_size >= 1, "buffer_size",
                f"must be >= 1 or -1, got {self.buffer_size}")
        require(self.rl != self.sft, "sft", f"must name another objective than rl ({self.rl!r})")

    def objective_names(self) -> list[str]:
        return [self.rl, self.sft]


@register_mixer("relift", ReLIFTConfig)
class ReLIFT:
    def __init__(self, config: ReLIFTConfig, weights: dict[str, float], seed: int):
        self.config, self.weights = config, weights
        self.buffer: list[int] = []                 # data rows of failed prompts, oldest first
        self.sft_steps = self.steps = 0

    def plan(self, step: int) -> MixPlan:
        c = self.config
        self.steps += 1
        if c.buffer_size != -1 and len(self.buffer) >= c.buffer_size:
            rows, self.buffer = tuple(self.buffer[: c.buffer_size]), self.buffer[c.buffer_size:]
            self.sft_steps += 1
            return MixPlan(self.weights | {c.rl: 0.0, c.sft: self.weights[c.sft]}, demo_rows=rows)
        return MixPlan(self.weights | {c.rl: self.weights[c.rl], c.sft: 0.0})

    def observe(self, step: int, report: StepReport) -> None:
        for group in report.groups:
            if max(group.rewards) <= self.config.threshold:
                self.buffer.append(group.row)

    def metrics(self) -> dict[str, float]:
        return {"mix/buffer_size": float(len(self.buffer)), "mix/sft_fraction": self.sft_steps / max(self.steps, 1)}

    def state_dict(self) -> dict:
        return {"buffer": self.buffer, "sft_steps": self.sft_steps, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.buffer, self.sft_steps, self.steps = list(state["buffer"]), state["sft_steps"], state["steps"]
