"""Data: load rows (synthetic task, local file or hub), map columns to roles, apply the chat template, mask prompts.

Roles a recipe maps to its columns (`data.columns`):
  prompt      the user turn: a string, or a list of chat messages
  completion  the demonstration: a string (the assistant's answer)
  messages    a whole conversation; the last assistant message is the completion, the rest the prompt
  answer      the gold answer a verifier reads (rewards also receive every raw column by name, as in TRL)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from posttrain.configlib import ConfigError, build, field_doc, require
from posttrain.experience import DEMO, PROMPT, Experience, pad_right

ROLES = ("prompt", "completion", "messages", "answer")
NOT_REWARD_COLUMNS = ("prompt", "completion", "completion_ids")   # passed as prompts= / completions= instead (TRL)
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become tokens."""

    source: str = field_doc(doc="task:<name> (synthetic), a local .jsonl/.json/.parquet/.csv file, or a hub data set "
                                "name")
    split: str = field_doc("train", "split to read (hub data sets and synthetic tasks)")
    subset: str | None = field_doc(None, "hub configuration name (e.g. 'main' for openai/gsm8k)")
    columns: dict[str, str] = field_doc(factory=dict, doc="role -> column: prompt, completion, messages, answer")
    task: dict[str, Any] = field_doc(factory=dict, doc="settings of a synthetic task (source task:<name>)")
    system_prompt: str | None = field_doc(None, "system message put before every prompt")
    max_length: int = field_doc(1024, "longest prompt + completion in tokens")
    overlong: Literal["truncate", "drop"] = field_doc("drop", "what to do with longer examples (counted in metrics)")
    limit: int | None = field_doc(None, "use only the first N rows")

    def check(self) -> None:
        bad = [k for k in self.columns if k not in ROLES]
        require(not bad, "columns", f"unknown role(s) {bad}; allowed roles: {', '.join(ROLES)}")
        require(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        require(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")


@dataclass
class Example:
    prompt: list[dict]             # chat messages before the assistant's answer
    completion: str | None         # the demonstration, if any
    columns: dict[str, Any]        # every raw column, plus `answer` when mapped
    conversational: bool = False   # the data set's prompt was chat messages, not text

    def reward_prompt(self) -> Any:
        """The prompt as TRL hands it to reward functions: the messages if the data set's were, else the text."""
        return self.prompt if self.conversational else self.prompt[-1]["content"]

    def reward_completion(self, text: str) -> Any:
        """A generated completion as TRL hands it to reward functions: a list of one assistant message for
        conversational data, else the text."""
        return [{"role": "assistant", "content": text}] if self.conversational else text


@dataclass
class Tokenized:
    input_ids: list[int]
    prompt_len: int                # tokens [0, prompt_len) are prompt; the rest carry loss
    columns: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenStats:
    kept: int = 0
    truncated: int = 0
    dropped_overlong: int = 0


def load_rows(cfg: DataConfig, where: str = "data") -> tuple[list[dict], dict[str, str]]:
    """Raw rows and the role -> column mapping (recipe's over the task's defaults)."""
    if cfg.source.startswith("task:"):
        from posttrain.tasks import TASKS

        try:
            entry = TASKS.get(cfg.source[5:])
        except KeyError as e:
            raise ConfigError(f"{where}.source: {e.args[0]}") from None
        task_cfg = build(entry.config_cls, {"split": cfg.split, **cfg.task}, f"{where}.task")
        rows, columns = entry.generate(task_cfg), {**entry.columns, **cfg.columns}
    else:
        rows, columns = _load_dataset_rows(cfg, where), dict(cfg.columns)
    rows = rows[: cfg.limit] if cfg.limit else rows
    if not rows:
        raise ConfigError(f"{where}.source {cfg.source!r}: the data set is empty (split {cfg.split!r}, "
                          f"limit {cfg.limit})")
    return rows, columns


def _load_dataset_rows(cfg: DataConfig, where: str) -> list[dict]:
    import datasets

    path = Path(cfg.source)
    looks_local = path.suffix in FILE_FORMATS or path.exists() or cfg.source.startswith((".", "/"))
    if looks_local:
        if not path.is_file():
            raise FileNotFoundError(f"{where}.source: data file {cfg.source!r} not found")
        if path.suffix not in FILE_FORMATS:
            raise ConfigError(f"{where}.source: {cfg.source!r} has an unknown format; expected one of "
                              f"{', '.join(FILE_FORMATS)}")
        if not path.read_text(errors="replace").strip() if path.suffix != ".parquet" else path.stat().st_size == 0:
            raise ConfigError(f"{where}.source: data file {cfg.source!r} is empty")
        try:
            ds = datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as e:  # datasets' own errors don't say which recipe key pointed at the file
            raise ConfigError(f"{where}.source: could not read {cfg.source!r}: {type(e).__name__}: {e}") from e
    else:
        ds = datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split)
    return ds.to_list()


def to_examples(rows: list[dict], columns: dict[str, str], cfg: DataConfig, where: str = "data") -> list[Example]:
    """Map raw rows to chat-formatted examples, naming the row and column of any problem."""
    present = set(rows[0])
    missing = {role: col for role, col in columns.items() if col not in present}
    if missing:
        role, col = next(iter(missing.items()))
        raise ConfigError(f"{where}.columns.{role}: column {col!r} not in {cfg.source!r}; "
                         f"its columns: {', '.join(sorted(present))}")
    if "messages" not in columns and "prompt" not in columns:
        for role in ("messages", "prompt"):
            if role in present:
                columns = {**columns, role: role}
                break
        else:
            raise ConfigError(f"{where}.columns: no prompt: map the role 'prompt' or 'messages' to a column of "
                             f"{cfg.source!r} (its columns: {', '.join(sorted(present))})")
    if "completion" not in columns and "completion" in present and "messages" not in columns:
        columns = {**columns, "completion": "completion"}
    return [_example(row, columns, cfg, i) for i, row in enumerate(rows)]


def _example(row: dict, columns: dict[str, str], cfg: DataConfig, i: int) -> Example:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    extra = dict(row)
    if "answer" in columns:
        extra["answer"] = row[columns["answer"]]
    if "messages" in columns:
        msgs = row[columns["messages"]]
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) for m in msgs):
            raise ConfigError(f"{cfg.source!r} row {i}: column {columns['messages']!r} must be a list of chat messages")
        if msgs[-1].get("role") == "assistant":
            return Example(system + msgs[:-1], msgs[-1]["content"], extra, conversational=True)
        return Example(system + msgs, None, extra, conversational=True)
    prompt = row[columns["prompt"]]
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if not isinstance(prompt, (str, list)):
        raise ConfigError(f"{cfg.source!r} row {i}: prompt column {columns['prompt']!r} must be text or messages")
    completion = row[columns["completion"]] if "completion" in columns else None
    if isinstance(completion, list):  # conversational completion: [{"role": "assistant", "content": ...}]
        completion = completion[-1]["content"]
    return Example(system + prompt_msgs, completion, extra, conversational=isinstance(prompt, list))


def tokenize_demos(examples: list[Example], tokenizer, cfg: DataConfig,
                   where: str = "data") -> tuple[list[Tokenized], TokenStats]:
    """Prompt + demonstration token ids with the prompt length; over-long ones truncated or dropped."""
    stats, out = TokenStats(), []
    for i, ex in enumerate(examples):
        if ex.completion is None:
            raise ConfigError(f"{where}: row {i} of {cfg.source!r} has no completion; a demonstration objective needs "
                             "the role 'completion' (or a final assistant message) mapped to a column")
        prompt_text = tokenizer.apply_chat_template(ex.prompt, add_generation_prompt=True, tokenize=False)
        full_text = tokenizer.apply_chat_template(ex.prompt + [{"role": "assistant", "content": ex.completion}],
                                                  tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ConfigError(f"{where}: row {i}: the chat template renders the conversation so that it does not start "
                             "with the rendered prompt; cannot separate prompt from completion")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop" or len(prompt_ids) >= cfg.max_length:
                stats.dropped_overlong += 1
                continue
            ids, stats.truncated = ids[: cfg.max_length], stats.truncated + 1
        out.append(Tokenized(ids, len(prompt_ids), ex.columns))
    stats.kept = len(out)
    if not out:
        raise ConfigError(f"{where}: every example of {cfg.source!r} is longer than max_length={cfg.max_length} and "
                          "was dropped")
    return out, stats


def collate_demos(items: list[Tokenized], pad_id: int) -> Experience:
    """Right-padded Experience whose loss mask is exactly the completion tokens."""
    input_ids = pad_right([t.input_ids for t in items], pad_id)                      # [B, T]
    attention = pad_right([[1] * len(t.input_ids) for t in items], 0, input_ids.shape[1])
    loss_mask = pad_right([[0] * t.prompt_len + [1] * (len(t.input_ids) - t.prompt_len) for t in items], 0,
                          input_ids.shape[1])
    source = torch.where(loss_mask.bool(), DEMO, PROMPT) * attention
    return Experience(input_ids=input_ids, attention_mask=attention, loss_mask=loss_mask, source=source,
                      columns=[t.columns for t in items])


class EpochSampler:
    """Deterministic global order over a data set: a fresh seeded permutation per epoch.

    Global position p (= step * batch_size + j) maps to row perm(p // N)[p % N], so the data position of a run
    is just its step, the same for any number of processes, and resume is exact.
    """

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.size)[p % self.size]) for p in range(start, start + count)]
