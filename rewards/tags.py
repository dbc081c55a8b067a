"""`format`: 1.0 when the completion follows a tag layout such as `<think>...</think><answer>...</answer>`."""
from __future__ import annotations

import functools
import re

from posttrain.rewards.answers import completion_text
from posttrain.rewards.registry import register


@functools.lru_cache(maxsize=64)
def layout_regex(tags: tuple[str, ...], strict: bool) -> re.Pattern:
    """The regex of `tags` in order: each `<tag>...</tag>` once; `strict` allows only whitespace around them."""
    if not tags or not all(re.fullmatch(r"[\w.:-]+", t) for t in tags):
        raise ValueError(f"format: tags must be a non-empty list of tag names (letters, digits, _.:-), "
                         f"got {list(tags)}")
    blocks = [rf"<{t}>(?:(?!</?{t}>).)*</{t}>" for t in map(re.escape, tags)]
    if strict:
        return re.compile(r"\s*" + r"\s*".join(blocks) + r"\s*", re.DOTALL)
    return re.compile(r".*?" + r".*?".join(blocks) + r".*", re.DOTALL)


@register("format")
def format(prompts, completions, *, tags: list[str] | tuple[str, ...] = ("think", "answer"), strict: bool = True,
           pattern: str | None = None, prefix: str = "", **kwargs) -> list[float]:
    """1.0 when `prefix + completion` matches the layout, else 0.0.

    The layout is the `tags` in order, each as one `<tag>...</tag>` block without a nested tag of the same
    name. `strict` (default): nothing but whitespace before, between and after the blocks; `strict=False`: other
    text may surround them. `pattern`, if given, is a regex that must match the whole text instead (DOTALL).
    `prefix` is text the prompt already ends with (e.g. `<think>` added by a chat template) so the model never
    writes it.

    >>> format(["q"] * 3, ["<think>2+2</think>\\n<answer>4</answer>", "<answer>4</answer>",
    ...                    "<think>a</think><answer>4</answer>!"])
    [1.0, 0.0, 0.0]
    >>> format(["q"], ["2+2</think> <answer>4</answer>"], prefix="<think>")
    [1.0]
    >>> format(["q"], ["Sure. <reasoning>x</reasoning> then <solution>4</solution>"], tags=["reasoning", "solution"],
    ...        strict=False)
    [1.0]
    """
    regex = re.compile(pattern, re.DOTALL) if pattern is not None else layout_regex(tuple(tags), strict)
    return [1.0 if regex.fullmatch(prefix + completion_text(c)) else 0.0 for c in completions]
