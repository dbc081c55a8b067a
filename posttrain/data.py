"""Data: load rows (synthetic task, local file or hub), map columns to roles, render prompts, mask demonstrations.

Roles a recipe maps to its columns (`data.columns`):
  prompt      the user turn: a string, or a list of chat messages
  completion  the demonstration: a string (the assistant's answer)
  messages    a whole conversation; the last assistant message is the completion, the rest the prompt
  answer      the gold answer a verifier reads (rewards also receive every raw column by name, as in TRL)

How text is rendered (`render_prompt`, `tokenize_demos`), with the tokenizer's chat template or, for base checkpoints,
`data.prompt_template`:
  prompt       apply_chat_template(messages, add_generation_prompt=True, **data.chat_template_kwargs): what the
               rollout engines continue (rollout/base.py encode_prompts, the one place prompt ids are made)
  demonstration  the whole conversation rendered once, apply_chat_template(messages, **kwargs), and tokenized once:
               its ids are exactly the template's. Each trained assistant turn (the last, or all with
               data.assistant_turns: all) carries loss from where the template's generation prompt for that turn
               ends to its end-of-turn token included (the first special token after it, e.g. <|im_end|>); nothing
               of the system / user turns, the headers or what follows the end-of-turn token. A turn without
               reasoning that the template opens with an empty reasoning block (Qwen3's "<think>\n\n</think>\n\n",
               exactly what its generation prompt adds with enable_thinking=false) starts after that block.
               A token straddling a span boundary carries loss.
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
    chat_template_kwargs: dict[str, Any] = field_doc(
        factory=dict, doc="extra variables for the tokenizer's chat template, for demonstrations, rollout and eval "
                          "prompts alike (e.g. {enable_thinking: false} for Qwen3)")
    prompt_template: str | None = field_doc(
        None, "instead of the chat template (base checkpoints, R1-Zero style): a text with one {prompt} where the "
              "user's text goes, e.g. 'A conversation between User and Assistant. ... User: {prompt} Assistant: "
              "<think>'; a demonstration follows it directly and ends with the tokenizer's EOS")
    assistant_turns: Literal["last", "all"] = field_doc(
        "last", "which assistant turns of a `messages` conversation carry loss: the last only, or every one")

    def check(self) -> None:
        bad = [k for k in self.columns if k not in ROLES]
        require(not bad, "columns", f"unknown role(s) {bad}; allowed roles: {', '.join(ROLES)}")
        if self.prompt_template is not None:
            require(self.prompt_template.count("{prompt}") == 1, "prompt_template",
                    f"must contain {{prompt}} exactly once, got {self.prompt_template!r}")
            require(self.system_prompt is None, "system_prompt",
                    "a chat message: with prompt_template, write the system text into the template instead")
            require(not self.chat_template_kwargs, "chat_template_kwargs",
                    "apply to the chat template, which prompt_template replaces")
        require(self.max_length >= 2, "max_length", f"must be >= 2, got {self.max_length}")
        require(self.limit is None or self.limit >= 1, "limit", f"must be >= 1, got {self.limit}")


@dataclass
class Example:
    prompt: list[dict]             # chat messages before the assistant's answer
    completion: str | None         # the demonstration's text, if any
    columns: dict[str, Any]        # every raw column, plus `answer` when mapped
    conversational: bool = False   # the data set's prompt was chat messages, not text
    reply: dict | None = None      # the demonstration as the data's chat message (content, reasoning_content, ...)

    def reward_prompt(self) -> Any:
        """The prompt as TRL hands it to reward functions: the messages if the data set's were, else the text."""
        return self.prompt if self.conversational else self.prompt[-1]["content"]

    def reward_completion(self, text: str) -> Any:
        """A generated completion as TRL hands it to reward functions: a list of one assistant message for
        conversational data, else the text."""
        return [{"role": "assistant", "content": text}] if self.conversational else text

    def conversation(self) -> list[dict]:
        """The prompt messages followed by the demonstration as an assistant message."""
        return self.prompt + [self.reply or {"role": "assistant", "content": self.completion}]


@dataclass
class Tokenized:
    input_ids: list[int]
    prompt_len: int                # tokens [0, prompt_len): the last trained turn's prompt, as encode_prompts gives it
    columns: dict[str, Any] = field(default_factory=dict)
    loss_mask: list[int] | None = None   # 1 on tokens that carry loss (None: every token from prompt_len on)
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
            return Example(system + msgs[:-1], msgs[-1]["content"], extra, conversational=True, reply=msgs[-1])
        return Example(system + msgs, None, extra, conversational=True)
    prompt = row[columns["prompt"]]
    if not isinstance(prompt, str) and not _is_chat(prompt):
        raise bad("prompt", "text or a list of chat messages")
    prompt_msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    completion = row[columns["completion"]] if "completion" in columns else None
    reply = None
    if isinstance(completion, list) and _is_chat(completion):  # conversational: [{"role": "assistant", ...}]
        reply = completion[-1]
        completion = reply["content"]
    if "completion" in columns and not isinstance(completion, str):
        raise bad("completion", "text or a list of chat messages")
    return Example(system + prompt_msgs, completion, extra, conversational=isinstance(prompt, list), reply=reply)


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


def render_prompt(tokenizer, prompt: list[dict], cfg: DataConfig | None = None) -> str:
    """The text a model continues to answer `prompt` (chat messages): the chat template with its generation prompt
    and `cfg.chat_template_kwargs`, or `cfg.prompt_template` around the user's text."""
    if cfg is not None and cfg.prompt_template is not None:
        if len(prompt) != 1 or prompt[0].get("role") != "user":
            raise ValueError(f"data.prompt_template formats one user text; got a conversation of {len(prompt)} "
                             f"messages ({', '.join(str(m.get('role')) for m in prompt)})")
        return cfg.prompt_template.replace("{prompt}", prompt[0]["content"])
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template: set data.prompt_template (e.g. 'Question: {prompt}\n"
                         "Answer:') or use a tokenizer with one (model.tokenizer)")
    kwargs = cfg.chat_template_kwargs if cfg is not None else {}
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False, **kwargs)


def tokenize_text(tokenizer, text: str | list[str], cfg: DataConfig | None = None, offsets: bool = False):
    """Token ids of rendered text: a chat template writes its own special tokens (none added); a prompt template is
    plain text, tokenized as the tokenizer does by default (a BOS where it adds one)."""
    plain = cfg is not None and cfg.prompt_template is not None
    return tokenizer(text, add_special_tokens=plain, return_offsets_mapping=offsets)


def tokenize_demos(examples: list[Example], tokenizer, cfg: DataConfig,
                   where: str = "data") -> tuple[list[Tokenized], TokenStats]:
    """Demonstration token ids and loss masks (see the module docstring); over-long ones truncated or dropped."""
    stats, out, rendered = TokenStats(), [], []
    for i, ex in enumerate(examples):
        if ex.completion is None:
            raise ConfigError(f"{where}.columns: {cfg.source!r} {row_name(cfg, i)} has no completion; a demonstration "
                              "objective needs the role 'completion' (or a final assistant message) mapped to a column")
        try:
            rendered.append(render_demo(tokenizer, ex, cfg))
        except ValueError as e:
            raise ConfigError(f"{where}: {cfg.source!r} {row_name(cfg, i)}: {e}") from None
    enc = tokenize_text(tokenizer, [text for text, _ in rendered], cfg, offsets=True)   # one batched call
    special = set(tokenizer.all_special_ids)
    for i, (ex, (_, turns), ids, spans) in enumerate(zip(examples, rendered, enc["input_ids"], enc["offset_mapping"])):
        try:
            mask, prompt_len = _mask_turns(ids, spans, turns, special)
        except ValueError as e:
            raise ConfigError(f"{where}: {cfg.source!r} {row_name(cfg, i)}: {e}; the template's end-of-turn token must "
                              f"be a special token, such as {tokenizer.eos_token!r}") from None
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop" or prompt_len >= cfg.max_length:
                stats.dropped_overlong += 1
                continue
            ids, mask, stats.truncated = ids[: cfg.max_length], mask[: cfg.max_length], stats.truncated + 1
        out.append(Tokenized(ids, prompt_len, ex.columns, mask, i))
    stats.kept = len(out)
    if not out:
        raise ConfigError(f"{where}.max_length: every example of {cfg.source!r} is longer than max_length="
                          f"{cfg.max_length} tokens (prompt + completion) and was dropped")
    return out, stats


def render_demo(tokenizer, ex: Example, cfg: DataConfig) -> tuple[str, list[tuple[int, int]]]:
    """The demonstration's text, rendered once, and per trained assistant turn the character offsets where its
    prompt ends (its generation prompt rendered alone ends there) and where its trained text starts."""
    if cfg.prompt_template is not None:
        prompt = render_prompt(tokenizer, ex.prompt, cfg)
        return prompt + ex.completion + (tokenizer.eos_token or ""), [(len(prompt), len(prompt))]
    conv, kwargs = ex.conversation(), cfg.chat_template_kwargs
    text = tokenizer.apply_chat_template(conv, tokenize=False, **kwargs)
    thinks = "enable_thinking" in tokenizer.chat_template and kwargs.get("enable_thinking", True) is not False
    turns = [k for k, m in enumerate(conv) if m.get("role") == "assistant"]
    starts = []
    for k in turns if cfg.assistant_turns == "all" else turns[-1:]:
        head = render_prompt(tokenizer, conv[:k], cfg)
        if not text.startswith(head):
            raise ValueError(f"the chat template renders the conversation before assistant turn {k} differently "
                             "from that turn's prompt; cannot tell where the turn starts")
        quiet = tokenizer.apply_chat_template(conv[:k], add_generation_prompt=True, tokenize=False,
                                              **{**kwargs, "enable_thinking": False}) if thinks else head
        empty_block = len(quiet) > len(head) and quiet.startswith(head) and text.startswith(quiet)
        starts.append((len(head), len(quiet) if empty_block else len(head)))   # Qwen3's empty <think>: scaffolding
    return text, starts


def _mask_turns(ids: list[int], spans: list[tuple[int, int]], turns: list[tuple[int, int]],
                special: set[int]) -> tuple[list[int], int]:
    """The loss mask of tokens `ids` (character spans `spans`): each turn from its trained start to its end-of-turn
    token (the first special token) included; and the length of the last turn's prompt in tokens."""
    mask, prompt_len = [0] * len(ids), len(ids)
    for prompt_end, start in turns:
        prompt_len = next((j for j, (_, end) in enumerate(spans) if end > prompt_end), len(ids))
        first = next((j for j, (_, end) in enumerate(spans) if end > start), len(ids))
        stop = next((j for j in range(first, len(ids)) if ids[j] in special), None)
        if stop is None:
            raise ValueError(f"no end-of-turn token after the assistant's text at character {start}")
        mask[first : stop + 1] = [1] * (stop + 1 - first)
    return mask, prompt_len


def demo_completion_ids(tokenizer, ex: Example, cfg: DataConfig) -> list[int] | None:
    """The demonstration's response tokens as the policy would write them after its prompt (the prompt the rollout
    engines get: render_prompt): the rendered conversation after that prompt, through the first special token (the
    end of turn, where generation stops). None when there is no demonstration."""
    if ex.completion is None:
        return None
    text, _ = render_demo(tokenizer, ex, cfg)
    head = render_prompt(tokenizer, ex.prompt, cfg)
    if not text.startswith(head):
        raise ValueError("the chat template renders the demonstration's conversation so that it does not start with "
                         "its prompt; cannot tell where the response starts")
    ids = tokenizer(text[len(head):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids)
    stop = next((j for j, t in enumerate(ids) if t in special), None)
    return ids[: stop + 1] if stop is not None else ids + [tokenizer.eos_token_id]


def collate_demos(items: list[Tokenized], pad_id: int) -> Experience:
    """Right-padded Experience whose loss mask is exactly the demonstrations' trained tokens."""
    input_ids = pad_right([t.input_ids for t in items], pad_id)                      # [B, T]
    attention = pad_right([[1] * len(t.input_ids) for t in items], 0, input_ids.shape[1])
    masks = [t.loss_mask if t.loss_mask is not None else [0] * t.prompt_len + [1] * (len(t.input_ids) - t.prompt_len)
             for t in items]
    loss_mask = pad_right(masks, 0, input_ids.shape[1])
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
