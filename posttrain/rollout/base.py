"""The rollout interface every engine implements (hf, vllm, vllm-server).

Prompts go in as token ids (already chat-templated) together with sampling settings; out come, per prompt, `n`
completions with their token ids, text, the log-probability the sampler gave each generated token, and why the
completion ended. A `prefix` per prompt (token ids of a partial assistant message) makes the engine continue it:
the prefix is part of the prompt for the engine and is *not* repeated in the completion.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

from posttrain.configlib import field_doc, require
from posttrain.registry import Registry


@dataclass(frozen=True)
class SamplingConfig:
    """Sampling settings of one generate call."""

    n: int = field_doc(1, "completions per prompt (the group size G)")
    temperature: float = field_doc(1.0, "softmax temperature (0 = greedy)")
    top_p: float = field_doc(1.0, "nucleus sampling mass (1 = off)")
    top_k: int = field_doc(0, "sample from the k most likely tokens (0 = off)")
    max_new_tokens: int = field_doc(256, "generation budget per completion")
    stop: list[str] = field_doc(factory=list, doc="stop strings (the EOS token always stops)")
    seed: int | None = field_doc(None, "sampling seed (None = the trainer's RNG stream)")

    def check(self) -> None:
        require(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        require(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        require(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        require(self.top_k >= 0, "top_k", f"must be >= 0, got {self.top_k}")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass
class Completion:
    token_ids: list[int]            # generated tokens (stop string/EOS included when hit; no padding)
    text: str                       # decoded generated tokens, special tokens skipped
    logprobs: list[float]           # sampler's log-probability of each generated token (same length as token_ids)
    finish_reason: Literal["stop", "length"]
    prompt_index: int = 0           # which prompt of the call this completion answers


class RolloutEngine(Protocol):
    name: str

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig,
                 prefixes: list[list[int]] | None = None) -> list[list[Completion]]:
        """`len(prompts)` lists of `sampling.n` completions each."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights (a no-op for engines that use them directly)."""
        ...

    def close(self) -> None:
        ...


# name -> factory(model, tokenizer, config dict, accelerator) -> RolloutEngine
ENGINES: Registry = Registry("rollout engine")
