"""`math`: 1.0 when the completion's final answer is mathematically equivalent to the gold answer (math-verify)."""
from __future__ import annotations

import functools
import re
import threading

from posttrain.rewards.answers import column, completion_text
from posttrain.rewards.registry import register

_DELIMITED = re.compile(r"(?<!\\)\$|\\boxed|\\fbox|\\\(|\\\[")   # an unescaped $, \boxed, \fbox, \( or \[


@functools.lru_cache(maxsize=4096)
def _parse_gold(gold: str, timeout: int | None) -> tuple:
    """math-verify's parse of a gold answer; bare LaTeX (`\\frac{1}{2}`, `2\\pi`) is read as inline math first."""
    from math_verify import parse

    if _DELIMITED.search(gold):
        return tuple(parse(gold, parsing_timeout=timeout))
    return tuple(parse(f"${gold}$", parsing_timeout=timeout) or parse(gold, parsing_timeout=timeout))


@register("math")
def math(prompts, completions, *, gold_column: str = "answer", timeout: int = 5, float_rounding: int = 6,
         strict: bool = True, **columns) -> list[float | None]:
    r"""Equivalence of the completion's answer with the gold answer in column `gold_column`, by math-verify.

    math-verify extracts the completion's answer (the last `\boxed{}` first, then other LaTeX or plain
    expressions) and compares with sympy: numbers to `float_rounding` decimals, fractions, radicals,
    symbolic expressions, equations, intervals, sets, matrices. The gold may be bare LaTeX (`\frac{1}{2}`),
    delimited (`$x \in [0, 1)$`) or a whole solution ending in `\boxed{}`. `strict=False` compares
    variables by position and sets with tuples. A gold of None abstains; a gold math-verify cannot read is a
    data error (ValueError naming the sample). math-verify bounds each parse/compare with `timeout` seconds
    through SIGALRM, which only works in a main thread; elsewhere (a thread executor) the reward runs without it,
    so the recipe's per-call `timeout` is the bound: this reward prefers the process executor for that reason.

    >>> math(["q"] * 4, [r"so $\boxed{0.5}$", r"\boxed{\frac{2}{4}}", "The answer is 1/2.", r"\boxed{2}"],
    ...      answer=[r"\frac{1}{2}"] * 4)
    [1.0, 1.0, 1.0, 0.0]
    """
    from math_verify import parse, verify

    golds = column(columns, gold_column, "math", len(completions), "gold_column")
    in_main = threading.current_thread() is threading.main_thread()
    limit = timeout if in_main and timeout else None
    out: list[float | None] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        if gold is None:
            out.append(None)
            continue
        target = list(_parse_gold(str(gold), limit))
        if not target:
            raise ValueError(f"math: sample {i}: math-verify cannot read the gold answer in column {gold_column!r}: "
                             f"{str(gold)[-100:]!r}")
        answer = parse(completion_text(completion), parsing_timeout=limit)
        ok = bool(answer) and verify(target, answer, float_rounding=float_rounding, strict=strict,
                                     timeout_seconds=limit)
        out.append(1.0 if ok else 0.0)
    return out


math.reward_executor = "process"   # sympy is CPU-heavy and only a main thread gets math-verify's own timeouts
