"""Answer extraction shared by the verifiable rewards."""
from __future__ import annotations

import re

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def completion_text(completion) -> str:
    """Completions arrive as text, or (conversational data, as in TRL) as a list of messages."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def to_number(text: str) -> float | None:
    cleaned = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(cleaned)
    except ValueError:
        return None


def extract_final_answer(text: str) -> str | None:
    """The text after the last `####`, else the last number in the text."""
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else None
    numbers = re.findall(_NUMBER, text)
    return numbers[-1] if numbers else None
