"""Greedy accuracy of a model on held-out prompts, verified by a reward function: the one path behind the trainer's
evaluations, `posttrain eval` and the benchmarks.

    held_out_examples(cfg)                        the first cfg.num_samples rows of cfg.data, as Examples
    greedy_verdicts(model, tok, cfg, examples)    greedy completions and their 1.0 / 0.0 verdicts by cfg.reward
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from posttrain.data import DataConfig, Example, load_rows, to_examples
from posttrain.rollout.base import SamplingConfig, encode_prompts
from posttrain.rollout.hf import HFEngine, HFEngineConfig

if TYPE_CHECKING:
    from posttrain.config import EvalConfig


def held_out_examples(cfg: EvalConfig, where: str) -> list[Example]:
    """The first `cfg.num_samples` examples of `cfg.data`; `where` is the data's key path, named in errors."""
    rows, columns = load_rows(cfg.data, where)
    return to_examples(rows[: cfg.num_samples], columns, cfg.data, where)


def greedy_verdicts(model, tokenizer, cfg: EvalConfig, examples: list[Example],
                    accelerator=None) -> tuple[list[str], list[float]]:
    """Greedy completions of `examples` (see greedy_completions; under ZeRO-3 every process must call this) and
    their verdicts: 1.0 where the reward `cfg.reward` is >= `cfg.threshold`, else 0.0."""
    import rewards

    completions = greedy_completions(model, tokenizer, [ex.prompt for ex in examples], cfg.max_new_tokens,
                                     cfg.batch_size, accelerator, cfg.data)
    return completions, score(rewards.get(cfg.reward), examples, completions, cfg.threshold) if examples else []


def greedy_completions(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int, batch_size: int,
                       accelerator=None, data: DataConfig | None = None) -> list[str]:
    """Greedy completion texts, decoded by the `hf` rollout engine (left padding, KV cache, the template's end of turn
    as EOS). `model` may be wrapped (DDP, DeepSpeed); under ZeRO-3 the engine gathers the sharded weights, a
    collective, so every process must call this, with any number of prompts (zero included). Prompts are rendered
    as `data` says (chat template kwargs or a prompt template; rollout/base.py encode_prompts)."""
    engine = HFEngine(model, tokenizer, HFEngineConfig(batch_size=batch_size), accelerator=accelerator)
    outs = engine.generate(encode_prompts(tokenizer, prompts, data),
                           SamplingConfig(n=1, temperature=0.0, max_new_tokens=max_new_tokens))
    return [o[0].text for o in outs]


def score(reward_fn, examples: list[Example], completions: list[str], threshold: float) -> list[float]:
    """1.0 / 0.0 per example: is the verifier's reward >= threshold? Columns are passed as in TRL."""
    columns = {k: [ex.columns.get(k) for ex in examples] for k in examples[0].columns}
    rewards = reward_fn(prompts=[ex.prompt for ex in examples], completions=completions, **columns)  # TRL's convention
    name = getattr(reward_fn, "__name__", repr(reward_fn))
    if len(rewards) != len(examples):
        raise ValueError(f"reward {name!r} returned {len(rewards)} values for {len(examples)} completions")
    return [1.0 if (r is not None and r >= threshold) else 0.0 for r in rewards]
