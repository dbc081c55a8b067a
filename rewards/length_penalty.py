"""`overlong` (alias `length`): DAPO's soft overlong punishment, arXiv 2503.14476 (eq. 13; docs/provenance.md)."""
from __future__ import annotations

import functools

from posttrain.rewards.answers import completion_text
from posttrain.rewards.registry import REWARDS, register


def overlong_penalty(length: int, max_length: int, cache_length: int) -> float:
    """R_len(y) = 0                                  if |y| <= L_max - L_cache
                = ((L_max - L_cache) - |y|) / L_cache   if L_max - L_cache < |y| <= L_max
                = -1                                 if |y| > L_max

    >>> [overlong_penalty(n, 100, 20) for n in (80, 90, 100, 101)]
    [0.0, -0.5, -1.0, -1.0]
    """
    budget = max_length - cache_length                     # L_max - L_cache
    if length <= budget:
        return 0.0
    if length <= max_length:
        return (budget - length) / cache_length            # linear ramp from 0 down to -1
    return -1.0


@functools.lru_cache(maxsize=4)
def _tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


@register("overlong")
def overlong(prompts, completions, *, max_length: int = 20480, cache_length: int = 4096, tokenizer: str | None = None,
             completion_ids=None, **kwargs) -> list[float]:
    """DAPO's soft overlong punishment of each completion's length |y| (see `overlong_penalty`).

    |y| is in tokens: `len(completion_ids[i])` when the trainer passes `completion_ids` (TRL and posttrain do);
    else the completion re-tokenized with `tokenizer` (a local path or hub name) when set; else, as a documented
    approximation, the number of whitespace-separated words. The defaults are DAPO's (L_max 20480, L_cache
    4096); set `max_length` to the generation budget (max_new_tokens) of the recipe.

    >>> overlong(["q"] * 3, ["a", "b", "c"], completion_ids=[[1] * 6, [1] * 9, [1] * 12], max_length=10, cache_length=4)
    [0.0, -0.75, -1.0]
    >>> overlong(["q"], ["one two three"], max_length=3, cache_length=2)
    [-1.0]
    """
    if not 0 < cache_length <= max_length:
        raise ValueError(f"overlong: need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    if completion_ids is not None:
        if len(completion_ids) != len(completions):
            raise ValueError(f"overlong: {len(completion_ids)} completion_ids for {len(completions)} completions")
        lengths = [len(ids) for ids in completion_ids]
    elif tokenizer is not None:
        tok = _tokenizer(tokenizer)
        lengths = [len(tok(completion_text(c), add_special_tokens=False)["input_ids"]) for c in completions]
    else:
        lengths = [len(completion_text(c).split()) for c in completions]
    return [overlong_penalty(n, max_length, cache_length) for n in lengths]


length = REWARDS.register("length", overlong)
