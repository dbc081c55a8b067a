"""`steps`: 1.0 when every step of an arithmetic chain is shown and correct, and the final answer follows from them.

The `exact` reward checks the final answer only, and on task:arithmetic a small model can reach it by a shortcut
while writing wrong steps ("3+2=4 / 4-3=2 / 2-9=-7 / #### -7"): measured on the tiny quickstart model after 300 SFT
steps, 125 of 174 correct sampled answers had a wrong step. Reinforcing those teaches wrong arithmetic. `steps`
verifies the work line by line against the question instead.
"""
from __future__ import annotations

import re

from posttrain.rewards.answers import completion_text, extract_final_answer
from posttrain.rewards.registry import register
from posttrain.tasks.arithmetic import OPERATORS

_QUESTION = re.compile(r"(\d+(?:\s*[-+*]\s*\d+)+)\s*\?")
_LINE = re.compile(r"^\s*(-?\d+)\s*([-+*])\s*(\d+)\s*=\s*(-?\d+)\s*$")


def _chain(prompt, row: int) -> tuple[int, list[tuple[str, int]]]:
    """The question's first operand and its (operator, operand) steps."""
    text = prompt if isinstance(prompt, str) else next(
        (m["content"] for m in reversed(prompt) if m.get("role") == "user"), "")
    match = _QUESTION.search(text)
    if match is None:
        raise ValueError(f"reward 'steps': row {row}: the prompt has no arithmetic chain such as 'What is 7 + 5 - 3?', "
                         f"got {text[:80]!r}")
    tokens = re.findall(r"\d+|[-+*]", match.group(1))
    return int(tokens[0]), [(tokens[i], int(tokens[i + 1])) for i in range(1, len(tokens), 2)]


def _leading_correct(completion: str, first: int, chain: list[tuple[str, int]], gold: str) -> int:
    """How many units of work are right before the first mistake: each of the chain's lines in order, then the final
    `#### answer` (equal to the last line and to the gold answer). len(chain) + 1 means all of it."""
    work, _, _ = completion.partition("####")
    lines = [line for line in work.strip().splitlines() if line.strip()]
    value, done = first, 0
    for i, (op, operand) in enumerate(chain):
        m = _LINE.match(lines[i]) if i < len(lines) else None
        if m is None or (int(m[1]), m[2], int(m[3])) != (value, op, operand):
            return done
        value = OPERATORS[op](value, operand)
        if int(m[4]) != value:
            return done
        done += 1
    if len(lines) != len(chain):                               # extra lines before the answer
        return done
    return done + (extract_final_answer(completion) == str(value) == str(gold).strip())


@register("steps")
def steps(prompts, completions, answer, partial: bool = False, **columns) -> list[float]:
    """1.0 when the completion writes each step of the question's chain, left to right, one `a<op>b=c` line each,
    every line correct, and ends in `#### <answer>` equal to the gold answer; else 0.0. With `partial=True`, the
    fraction of the work right before the first mistake: k / (num_ops + 1) for k correct leading lines (+1 for the
    final answer), a dense signal for chains longer than the policy was taught.

    >>> steps(["What is 3 + 2 - 9?"], ["3+2=5\\n5-9=-4\\n#### -4"], answer=["-4"])
    [1.0]
    >>> steps(["What is 3 + 2 - 9?"], ["3+2=4\\n4-9=-5\\n#### -4"], answer=["-4"])   # right answer, wrong step
    [0.0]
    >>> steps(["What is 3 + 2 - 9?"], ["#### -4"], answer=["-4"])                    # no work shown
    [0.0]
    >>> steps(["What is 3 + 2 - 9?"], ["3+2=5\\n#### 5"], answer=["-4"], partial=True)  # 1 of 3 units
    [0.3333333333333333]
    """
    out = []
    for row, (prompt, completion, gold) in enumerate(zip(prompts, completions, answer, strict=True)):
        first, chain = _chain(prompt, row)
        done = _leading_correct(completion_text(completion), first, chain, gold)
        out.append(done / (len(chain) + 1) if partial else float(done == len(chain) + 1))
    return out
