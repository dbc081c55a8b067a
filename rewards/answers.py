"""Answer extraction shared by the verifiable rewards."""
from __future__ import annotations

import re

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"

# A number as written in prose: optional sign (ASCII or Unicode minus) and currency, thousands separators only
# in groups of three, optional decimals, optional "/denominator" written without spaces.
NUMBER_RE = re.compile(r"(?<![\w.])[-\u2212]?\s?[$\u20ac\u00a3\u00a5]?\s?"           # sign, currency
                       r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+(?:\.\d+)?)?"    # 1,234.5 or 3/4
                       r"|(?<![\w.])[-\u2212]?[$\u20ac\u00a3\u00a5]?\.\d+")            # .5
_ANSWER_IS_RE = re.compile(r"answer\s*(?:is|:|=)", re.IGNORECASE)
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


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


def parse_number(token: str) -> float | None:
    """A NUMBER_RE match (or similar text) as a float: commas, currency, Unicode minus and a/b handled.

    >>> [parse_number(t) for t in ["1,234.5", "-$18", "\u22123", "3/4", "$.5", "x"]]
    [1234.5, -18.0, -3.0, 0.75, 0.5, None]
    """
    cleaned = re.sub(r"[\s,$\u20ac\u00a3\u00a5]", "", token).replace("\u2212", "-")
    num, _, den = cleaned.partition("/")
    try:
        value = float(num)
        return value / float(den) if den else value
    except (ValueError, ZeroDivisionError):
        return None


def last_boxed(text: str) -> str | None:
    r"""The content of the last `\boxed{...}` (or `\fbox{...}`), braces balanced; None if there is none.

    >>> last_boxed(r"so \boxed{1} or rather \boxed{\frac{3}{4}}.")
    '\\frac{3}{4}'
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth, begin = 1, i
    while i < len(text):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
        i += 1
    return None


def _latex_to_plain(text: str) -> str:
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = re.sub(r"\\text\{[^{}]*\}|\\mathrm\{[^{}]*\}|\\[,!;: ]|\\%|%", " ", text)
    return text.replace("{,}", ",").replace("\\$", "$").replace("{", "").replace("}", "")


def first_number(text: str) -> float | None:
    match = NUMBER_RE.search(_latex_to_plain(text))
    return parse_number(match.group()) if match else None


def numeric_answer(text: str) -> float | None:
    r"""The final numeric answer of a solution, by the first rule that yields a number:

    1. the first number after the last `####` (GSM8K's format);
    2. the number in the last `\boxed{...}`;
    3. the first number after the last "answer is" / "answer:";
    4. the last number in the text.

    >>> [numeric_answer(t) for t in ["so 9 eggs\n#### 18", r"It is \boxed{\$1{,}000}.",
    ...                               "The answer is 7 apples, not 8.", "3 + 4 = 7 dollars", "no digits"]]
    [18.0, 1000.0, 7.0, 7.0, None]
    """
    marked = marked_answer(text)
    if marked is not None:
        return marked
    numbers = NUMBER_RE.findall(_latex_to_plain(text))
    return parse_number(numbers[-1]) if numbers else None


def marked_answer(text: str) -> float | None:
    r"""The answer only where the solution marks one (rules 1-3 of `numeric_answer`: `####`, `\boxed{}`, "answer
    is"); None for a bare last number.

    >>> [marked_answer(t) for t in ["so 9 eggs\n#### 18", "The answer is 7.", "3 + 4 = 7 dollars"]]
    [18.0, 7.0, None]
    """
    if "####" in text:
        value = first_number(text.rsplit("####", 1)[1])
        if value is not None:
            return value
    boxed = last_boxed(text)
    if boxed is not None:
        value = first_number(boxed)
        if value is not None:
            return value
    marks = list(_ANSWER_IS_RE.finditer(text))
    if marks:
        value = first_number(text[marks[-1].end():])
        if value is not None:
            return value
    return None


def column(columns: dict, name: str, reward: str, n: int, setting: str) -> list:
    """The data set column `name` that reward `reward` reads, checked to have one value per completion."""
    if name not in columns:
        raise KeyError(f"reward {reward!r} reads column {name!r}, which this batch does not have (columns: "
                       f"{', '.join(sorted(columns)) or 'none'}); map it in the data or set kwargs.{setting}")
    values = columns[name]
    if len(values) != n:
        raise ValueError(f"reward {reward!r}: column {name!r} has {len(values)} values for {n} completions")
    return list(values)
