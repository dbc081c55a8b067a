"""Synthetic task registry: `source: task:<name>` in a recipe's data section."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from posttrain.registry import Registry
from posttrain.tasks import arithmetic


@dataclass(frozen=True)
class TaskEntry:
    config_cls: type
    generate: Callable[..., list[dict]]  # config -> rows (dicts of columns)
    columns: dict[str, str]              # default role -> column mapping (prompt, completion, answer)
    corpus: Callable[..., list[str]]     # config -> text for training a tokenizer


TASKS: Registry[TaskEntry] = Registry("task")
TASKS.register("arithmetic", TaskEntry(
    arithmetic.ArithmeticConfig, arithmetic.generate,
    {"prompt": "question", "completion": "solution", "answer": "answer"}, arithmetic.corpus))
