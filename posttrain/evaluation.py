"""Greedy accuracy of a model on held-out prompts, verified by a reward function: the one path behind the trainer's
evaluations, `posttrain eval` and the benchmarks.

    held_out_examples(cfg)                        the first cfg.num_samples rows of cfg.data, as Examples
    greedy_verdicts(model, tok, cfg, examples)    greedy completions and their 1.0 / 0.0 verdicts by cfg.reward

The verifier runs through the same executor as the rewards of training (posttrain.rewarding.score_batch: its
timeout, on_error and validation of the values), called as TRL calls it: prompts and completions as messages for
conversational data, else as text; every other column by name; completion_ids.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.data import NOT_REWARD_COLUMNS, DataConfig, Example, load_rows, to_examples
from posttrain.rewarding import RewardSpec, score_batch
from posttrain.rewarding.loading import load_reward
from posttrain.rollout.base import Completion, SamplingConfig, encode_prompts
from posttrain.rollout.hf import HFEngine, HFEngineConfig

if TYPE_CHECKING:
    from posttrain.config import EvalConfig


def held_out_examples(cfg: EvalConfig, where: str) -> list[Example]:
    """The first `cfg.num_samples` examples of `cfg.data`; `where` is the data's key path, named in errors."""
    rows, columns = load_rows(cfg.data, where)
    return to_examples(rows[: cfg.num_samples], columns, cfg.data, where)


def greedy_verdicts(model, tokenizer, cfg: EvalConfig, examples: list[Example], accelerator=None,
                    where: str = "eval") -> tuple[list[str], list[float]]:
    """Greedy completions of `examples` (see greedy_completions; under ZeRO-3 every process must call this) and
    their verdicts: 1.0 where the reward `cfg.reward` is >= `cfg.threshold`, else 0.0. `where` is the eval
    section's key path, named in errors."""
    outs = greedy_completions(model, tokenizer, [ex.prompt for ex in examples], cfg.max_new_tokens, cfg.batch_size,
                              accelerator, cfg.data)
    texts = [o.text for o in outs]
    return texts, verdicts(cfg, examples, outs, where) if examples else []


def greedy_completions(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                       accelerator=None, data: DataConfig | None = None) -> list[Completion]:
    """Greedy completions (text and token ids), decoded by the `hf` rollout engine (left padding, KV cache, the
    template's end of turn as EOS). `model` may be wrapped (DDP, DeepSpeed); under ZeRO-3 the engine gathers the
    sharded weights, a collective, so every process must call this, with any number of prompts (zero included).
    Prompts are rendered as `data` says (chat template kwargs or a prompt template; rollout/base.py encode_prompts)."""
    engine = HFEngine(model, tokenizer, HFEngineConfig(batch_size=batch_size), accelerator=accelerator)
    outs = engine.generate(encode_prompts(tokenizer, prompts, data),
                           SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    return [o[0] for o in outs]


def verdicts(cfg: EvalConfig, examples: list[Example], completions: list[Completion],
             where: str = "eval") -> list[float]:
    """1.0 / 0.0 per example: is the verifier's reward >= cfg.threshold? A sample it abstains on (None) counts as
    wrong. Scored by `score_batch`, so a failing verifier raises a RewardError naming it (on_error: raise)."""
    reward = load_reward(RewardSpec(name=cfg.reward), f"{where}.reward", "eval")
    columns = {k: [ex.columns.get(k) for ex in examples] for k in examples[0].columns if k not in NOT_REWARD_COLUMNS}
    try:
        batch = score_batch([reward], [ex.reward_prompt() for ex in examples],
                            [ex.reward_completion(c.text) for ex, c in zip(examples, completions)], columns,
                            completion_ids=[c.token_ids for c in completions])
    finally:
        reward.close()
    return [1.0 if (r is not None and r >= cfg.threshold) else 0.0 for r in batch.values[reward.label]]
