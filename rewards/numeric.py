"""`gsm8k`: 1.0 when the completion's final number equals the gold answer's (within a tolerance), else 0.0 (or a
partial credit for a marked but wrong answer, as ReFT's 1 / 0.1 / 0)."""
from __future__ import annotations

import math as _math

from posttrain.rewards.answers import column, completion_text, marked_answer, numeric_answer
from posttrain.rewards.registry import data_check, register


@register("gsm8k")
def gsm8k(prompts, completions, *, gold_column: str = "answer", rel_tol: float = 1e-9, abs_tol: float = 1e-6,
          partial: float = 0.0, **columns) -> list[float | None]:
    r"""Numeric match of the final answer with the gold solution in column `gold_column` (GSM8K's `#### N`).

    The completion's answer is the first number after its last `####`, else in its last `\boxed{}`, else after
    its last "answer is", else its last number (rewards/answers.py::numeric_answer); thousands separators,
    currency signs, units and LaTeX (`\frac`, `\text`, `\$`) are handled. The gold is read the same way.
    Correct when `math.isclose(answer, gold, rel_tol=rel_tol, abs_tol=abs_tol)`. A sample whose gold is None
    abstains (None); a gold without any number is a data error (ValueError naming the sample).

    `partial` is the reward of a wrong answer that the completion marks as its answer (after `####`, in `\boxed{}`,
    or after "answer is"); a wrong bare last number or no number gets 0. ReFT (arXiv 2401.08967, Sec. 3) uses
    1 / 0.1 / 0 with `partial: 0.1` (and abs_tol 1e-2):

    >>> gsm8k(["q"] * 3, ["#### 18", "#### 17", "I think 17"], answer=["#### 18"] * 3, partial=0.1)
    [1.0, 0.1, 0.0]

    >>> gold = ["She sells 16 - 3 - 4 = 9 eggs for $2 each.\n#### 18"]
    >>> [gsm8k(["q"], [c], answer=gold)[0] for c in ["9 * 2 = 18\n#### 18", r"So $\boxed{\$18.00}$.",
    ...                                             "The answer is 18 dollars.", "She makes $18", "#### 19"]]
    [1.0, 1.0, 1.0, 1.0, 0.0]
    """
    golds = column(columns, gold_column, "gsm8k", len(completions), "gold_column")
    out: list[float | None] = []
    for i, (completion, gold) in enumerate(zip(completions, golds)):
        if gold is None:
            out.append(None)
            continue
        target = numeric_answer(str(gold))
        if target is None:
            raise ValueError(f"gsm8k: sample {i}: the gold answer in column {gold_column!r} has no number: "
                             f"{str(gold)[-100:]!r}")
        answer = numeric_answer(completion_text(completion))
        ok = answer is not None and _math.isclose(answer, target, rel_tol=rel_tol, abs_tol=abs_tol)
        out.append(1.0 if ok else partial if marked_answer(completion_text(completion)) is not None else 0.0)
    return out


@data_check(gsm8k)
def gsm8k_golds(columns: dict[str, list], *, gold_column: str = "answer", **settings) -> list[tuple[int, str]]:
    """Rows whose gold answer `gsm8k` would misread: no number in it, or no `####` where the column's other rows mark
    their final answer with one (the last number of the reasoning would be taken instead).

    >>> row, problem = gsm8k_golds({"answer": ["3 + 4 = 7\\n#### 7", "3 + 4 = 7", None, "none"]})[0]
    >>> row, problem.startswith("the gold answer in column 'answer' has no `####`"), problem.endswith("'3 + 4 = 7'")
    (1, True, True)
    """
    if gold_column not in columns:
        return [(0, f"the gold answer column {gold_column!r} is not in the data (its columns: "
                    f"{', '.join(sorted(columns))}); set kwargs.gold_column")]
    golds = [None if g is None else str(g) for g in columns[gold_column]]
    marked = any("####" in g for g in golds if g is not None)
    problems = []
    for i, gold in enumerate(golds):
        if gold is None:
            continue
        if numeric_answer(gold) is None:
            problems.append((i, f"the gold answer in column {gold_column!r} has no number: {gold[-80:]!r}"))
        elif marked and "####" not in gold:
            problems.append((i, f"the gold answer in column {gold_column!r} has no `####` (the column's other rows "
                                f"mark their final answer with it): {gold[-80:]!r}"))
    return problems
