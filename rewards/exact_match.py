"""`exact`: 1.0 when the completion's final answer equals the gold answer exactly, else 0.0."""
from __future__ import annotations

from posttrain.rewards.answers import completion_text, extract_final_answer
from posttrain.rewards.registry import register


@register("exact")
def exact(prompts, completions, answer, **columns) -> list[float]:
    """Exact match of the final answer (after `####`, else the last number) with the `answer` column.

    >>> exact(["What is 2+3?"], ["2+3=5\\n#### 5"], answer=["5"])
    [1.0]
    >>> exact(["What is 2+3?"], ["#### 6"], answer=["5"])
    [0.0]
    """
    out = []
    for completion, gold in zip(completions, answer, strict=True):
        gold_text = str(gold)
        gold_final = extract_final_answer(gold_text) if "####" in gold_text else gold_text.strip()
        out.append(1.0 if extract_final_answer(completion_text(completion)) == gold_final else 0.0)
    return out
