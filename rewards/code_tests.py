"""`code`: the fraction of a task's assert statements that the completion's Python code passes, in the sandbox."""
from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor

from posttrain.rewards.answers import column, completion_text
from posttrain.rewards.registry import register
from posttrain.rewards.sandbox import SandboxLimits, run_python

_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)
_PYTHON_TAGS = ("python", "python3", "py")


def extract_code(text: str) -> str:
    """The Python code of a completion: every ```python (or ```py) fenced block, joined in order; else every
    untagged ``` block; else the whole text. A final fence left open (generation cut off) runs to the end.

    >>> extract_code("Here:\\n```python\\ndef f():\\n    return 1\\n```\\nand a test\\n```python\\nprint(f())\\n```")
    'def f():\\n    return 1\\n\\nprint(f())\\n'
    >>> extract_code("def g(): pass")
    'def g(): pass'
    """
    blocks = [(tag.lower(), body) for tag, body in _FENCE_RE.findall(text)]
    python = [body for tag, body in blocks if tag in _PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    chosen = python or untagged
    return "\n".join(chosen) if chosen else text


def _as_tests(value, i: int, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return list(value)
    raise TypeError(f"code: sample {i}: column {name!r} must hold a list of test strings, got {type(value).__name__}")


@register("code")
def code(prompts, completions, *, tests_column: str = "tests", timeout: float = 10.0, cpu_seconds: int = 10,
         memory_mb: int = 1024, max_processes: int = 32, isolation: str = "auto", max_workers: int | None = None,
         **columns) -> list[float | None]:
    """Fraction of the tests in column `tests_column` (a list of assert statements, MBPP style) that pass after
    the completion's code (`extract_code`) runs, each completion in its own sandbox (rewards/sandbox.py) with
    a `timeout` (wall seconds), `cpu_seconds`, `memory_mb` and `max_processes` limit. A program that crashes,
    loops or breaks a limit scores the tests it passed before that (usually 0). No tests (None or []) abstains.
    Completions run concurrently on `max_workers` threads (default: the number of CPUs); the sandbox's own
    failure to start raises `SandboxError`.

    >>> code(["add"] * 2, ["```python\\ndef add(a, b):\\n    return a + b\\n```", "def add(a, b): return a - b"],
    ...      tests=[["assert add(1, 2) == 3", "assert add(0, 0) == 0"]] * 2)
    [1.0, 0.5]
    """
    tests = [_as_tests(t, i, tests_column) for i, t in enumerate(column(columns, tests_column, "code", len(completions),
                                                                            "tests_column"))]
    limits = SandboxLimits(timeout=timeout, cpu_seconds=cpu_seconds, memory_mb=memory_mb, max_processes=max_processes)

    def one(i: int) -> float | None:
        if not tests[i]:
            return None
        return run_python(extract_code(completion_text(completions[i])), tests[i], limits=limits,
                          isolation=isolation).fraction_passed

    workers = max(1, min(max_workers or os.cpu_count() or 1, len(completions)))
    with ThreadPoolExecutor(workers, thread_name_prefix="code-reward") as pool:
        return list(pool.map(one, range(len(completions))))
