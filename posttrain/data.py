"""Data: load rows (synthetic task, local file or hub), map columns to roles, apply the chat template, mask prompts.

Roles a recipe maps to its columns (`data.columns`):
  prompt      the user turn: a string, or a list of chat messages
  completion  the demonstration: a string (the assistant's answer)
  messages    a whole conversation; the last assistant message is the completion, the rest the prompt
  answer      the gold answer a verifier reads (rewards also receive every raw column by name, as in TRL)
"""
from __future__ import annotations

import contextlib
import json
import logging
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
    row: int = 0                   # index of the example in its data set (the same row a rollout prompt names)


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
        if path.is_dir():
            raise ConfigError(f"{where}.source: {cfg.source!r} is a directory; expected a data file "
                              f"({', '.join(FILE_FORMATS)})")
        if not path.is_file():
            raise FileNotFoundError(f"{where}.source: data file {cfg.source!r} not found")
        if path.suffix not in FILE_FORMATS:
            raise ConfigError(f"{where}.source: {cfg.source!r} has an unknown format; expected one of "
                              f"{', '.join(FILE_FORMATS)}")
        try:
            empty = not path.read_bytes().strip() if path.suffix != ".parquet" else path.stat().st_size == 0
        except OSError as e:
            raise ConfigError(f"{where}.source: data file {cfg.source!r} cannot be read: {e.strerror}") from None
        if empty:
            raise ConfigError(f"{where}.source: data file {cfg.source!r} is empty")
        try:
            with _quiet("datasets"):      # its own error log would come before (and without) the message below
                return datasets.load_dataset(FILE_FORMATS[path.suffix], data_files=str(path), split="train").to_list()
        except Exception as e:  # datasets' own errors don't say which recipe key, line or column is at fault
            found = _json_problem(path) if FILE_FORMATS[path.suffix] == "json" else None
            detail = found or f"{type(e).__name__}: {e}"
            raise ConfigError(f"{where}.source: could not read {cfg.source!r}: {detail}") from e
    return datasets.load_dataset(cfg.source, cfg.subset, split=cfg.split).to_list()


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Only CRITICAL records of a library's logger for the duration."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _json_problem(path: Path) -> str | None:
    """The first line of a JSON Lines file (or record of a JSON array) that cannot be a row: not UTF-8, not JSON, or
    not an object. None if there is none (datasets failed for another reason)."""
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_bytes())
        except UnicodeDecodeError as e:
            return f"not UTF-8 text ({e.reason} at byte {e.start})"
        except json.JSONDecodeError as e:
            return f"line {e.lineno}: not valid JSON ({e.msg} at column {e.colno})"
        records = [(f"record {i + 1}", r) for i, r in enumerate(data)] if isinstance(data, list) else []
    else:
        records = []
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            if not raw.strip():
                continue
            try:
                records.append((f"line {n}", json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError as e:
                return f"line {n}: not UTF-8 text ({e.reason} at byte {e.start})"
            except json.JSONDecodeError as e:
                return f"line {n}: not valid JSON ({e.msg} at column {e.colno})"
    return next((f"{name}: expected a JSON object (one row), got {type(record).__name__} {_short(record)}"
                 for name, record in records if not isinstance(record, dict)), None)


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
    return [_example(row, columns, cfg, i, where) for i, row in enumerate(rows)]


def _example(row: dict, columns: dict[str, str], cfg: DataConfig, i: int, where: str) -> Example:
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    extra = dict(row)
    if "answer" in columns:
        extra["answer"] = row[columns["answer"]]

    def bad(role: str, expected: str) -> ConfigError:
        value = row[columns[role]]
        return ConfigError(f"{where}.columns.{role}: {cfg.source!r} {row_name(cfg, i)}: column {columns[role]!r} must "
                           f"be {expected}, got {type(value).__name__} {_short(value)}")

    if "messages" in columns:
        msgs = row[columns["messages"]]
        if not _is_chat(msgs):
            raise bad("messages", "a list of chat messages ({role, content} objects)")
        if msgs[-1].get("role") == "assistant":
            return Example(system + msgs[:-1], msgs[-1]["content"], extra, conversational=True)
        return Example(system + msgs, None, extra, conversational=True)
    prompt = row[columns["prompt"]]
    if not isinstance(prompt, str) and not _is_chat(prompt):
        raise bad("prompt", "text or a list of chat messages")
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = row[columns["completion"]] if "completion" in columns else None
    if isinstance(completion, list) and _is_chat(completion):  # conversational: [{"role": "assistant", ...}]
        completion = completion[-1]["content"]
    if "completion" in columns and not isinstance(completion, str):
        raise bad("completion", "text or a list of chat messages")
    return Example(system + prompt_msgs, completion, extra, conversational=isinstance(prompt, list))


def _is_chat(value: Any) -> bool:
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and isinstance(m.get("content"), str) and "role" in m for m in value))


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def row_name(cfg: DataConfig, i: int) -> str:
    """Row i (0-based, after `limit`) as a user finds it: `line N` of a JSON Lines file, else `row N` (1-based)."""
    path = Path(cfg.source)
    if path.suffix == ".jsonl" and path.is_file():
        with path.open("rb") as f:
            lines = (n for n, raw in enumerate(f, 1) if raw.strip())
            line = next((n for k, n in enumerate(lines) if k == i), None)
        if line is not None:
            return f"line {line}"
    return f"row {i + 1}"


def require_prompts(kept: int, cfg: DataConfig, where: str) -> None:
    """At least one prompt of the data set fits in `max_length` tokens (RL stages drop the longer ones)."""
    if not kept:
        raise ConfigError(f"{where}.max_length: every prompt of {cfg.source!r} is longer than max_length="
                          f"{cfg.max_length} tokens")


def tokenize_demos(examples: list[Example], tokenizer, cfg: DataConfig,
                   where: str = "data") -> tuple[list[Tokenized], TokenStats]:
    """Prompt + demonstration token ids with the prompt length; over-long ones truncated or dropped."""
    stats, out = TokenStats(), []
    for i, ex in enumerate(examples):
        if ex.completion is None:
            raise ConfigError(f"{where}.columns: {cfg.source!r} {row_name(cfg, i)} has no completion; a demonstration "
                              "objective needs the role 'completion' (or a final assistant message) mapped to a column")
        prompt_text, completion_text = render_demo(tokenizer, ex.prompt, ex.completion,
                                                   f"{where}: {cfg.source!r} {row_name(cfg, i)}")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        ids = prompt_ids + tokenizer(completion_text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop" or len(prompt_ids) >= cfg.max_length:
                stats.dropped_overlong += 1
                continue
            ids, stats.truncated = ids[: cfg.max_length], stats.truncated + 1
        out.append(Tokenized(ids, len(prompt_ids), ex.columns, i))
    stats.kept = len(out)
    if not out:
        raise ConfigError(f"{where}.max_length: every example of {cfg.source!r} is longer than max_length="
                          f"{cfg.max_length} tokens (prompt + completion) and was dropped")
    return out, stats


def render_demo(tokenizer, prompt: list[dict], completion: str, where: str) -> tuple[str, str]:
    """(prompt text ending in the generation prompt, the completion text after it, end of turn included), split by
    rendering the prompt and the whole conversation with the chat template."""
    prompt_text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ConfigError(f"{where}: the chat template renders the conversation so that it does not start with the "
                          "rendered prompt; cannot separate prompt from completion")
    return prompt_text, full_text[len(prompt_text):]


def demo_completion_ids(tokenizer, prompt: list[dict], completion: str | None) -> list[int] | None:
    """The demonstration's response tokens as the policy would write them: the chat template's completion, cut after
    its first end-of-turn (EOS) token, which is where generation stops. None when there is no demonstration."""
    if completion is None:
        return None
    _, text = render_demo(tokenizer, prompt, completion, "demonstration")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids + ([eos] if eos is not None else [])


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
