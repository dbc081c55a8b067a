"""The rollout interface every engine implements (hf, vllm, vllm-server).

Prompts go in as token ids (already chat-templated) together with sampling settings; out come, per prompt, `n`
completions with their token ids, text, the log-probability the sampler gave each generated token, and why the
completion ended. A `prefix` per prompt (token ids of a partial assistant message) makes the engine continue it:
the prefix is part of the prompt for the engine and is *not* repeated in the completion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Protocol

from posttrain.configlib import field_doc, require
from posttrain.data import DataConfig, render_prompt, tokenize_text
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
        require(all(self.stop), "stop",
                f"stop strings must be non-empty (an empty one matches any text), got {self.stop}")


@dataclass
class Completion:
    """One sampled continuation of a prompt (+ prefix).

    Log-probabilities, with z the model's logits for the next token and y_t the generated token:
      logprobs[t]      log p_sample(y_t), p_sample = softmax(top_p(top_k(z / temperature))) renormalised over the
                       tokens top-k/top-p keep: the distribution y_t was actually drawn from (the behaviour policy mu).
                       Greedy decoding (temperature 0) draws from a point mass: every entry is 0.0.
      raw_logprobs[t]  log softmax(z)[y_t]: the policy itself at temperature 1, nothing removed (None if the engine
                       cannot report it).
    pi_old of the RL ratio is the policy at the *sampling temperature* without top-k/top-p, log softmax(z / T)[y_t]
    (the TRL/verl convention; the trainer's teacher-forced pass divides its logits by T). `logprobs` is exactly that
    whenever temperature > 0, top_k = 0 and top_p = 1; with top-k/top-p on, recompute pi_old by teacher forcing.
    """

    token_ids: list[int]            # generated tokens (stop string/EOS included when hit; no padding)
    text: str                       # decoded generated tokens, special tokens skipped
    logprobs: list[float]           # sampler's log-probability of each generated token (same length as token_ids)
    finish_reason: Literal["stop", "length"]
    prompt_index: int = 0           # which prompt of the call this completion answers
    raw_logprobs: list[float] | None = None  # temperature-1, unprocessed policy log-probs (same length), if reported


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
# name -> check(name) that raises ImportError saying how to install what the engine needs (run before training by
# posttrain/preflight.py; engines that need nothing beyond posttrain's dependencies have none)
ENGINE_REQUIREMENTS: dict[str, Callable[[str], None]] = {}


def encode_prompts(tokenizer, conversations: list[list[dict]], data: DataConfig | None = None) -> list[list[int]]:
    """Chat messages -> the prompt token ids the engines continue: `posttrain.data.render_prompt` (the chat template
    with its generation prompt and data.chat_template_kwargs, or data.prompt_template), tokenized as
    `posttrain.data.tokenize_text` does, so the ids are exactly those of a demonstration's prompt (no BOS twice)."""
    texts = [render_prompt(tokenizer, msgs, data) for msgs in conversations]
    return [list(ids) for ids in tokenize_text(tokenizer, texts, data)["input_ids"]] if texts else []


def prompt_contexts(prompts: list[list[int]], prefixes: list[list[int]] | None) -> list[list[int]]:
    """Prompt i + prefix i as one token list per prompt (validated)."""
    if prefixes is not None and len(prefixes) != len(prompts):
        raise ValueError(f"got {len(prefixes)} prefixes for {len(prompts)} prompts; "
                         "pass one (possibly empty) per prompt")
    contexts = [list(p) + (list(prefixes[i]) if prefixes is not None else []) for i, p in enumerate(prompts)]
    for i, ids in enumerate(contexts):
        if not ids:
            raise ValueError(f"prompt {i} is empty: the engine needs at least one token to continue")
    return contexts
