"""Rewards in a recipe, and running them on a batch: concurrently, each call bounded, every failure reported.

A recipe lists its rewards (each entry a `RewardSpec`):

    rewards:
      - {name: gsm8k, weight: 1.0}
      - {name: format, weight: 0.1, kwargs: {tags: [think, answer]}, on_error: zero}
      - {name: my_rewards.py:brevity, weight: 0.05, alias: brevity, timeout: 30}

`load_rewards(specs)` resolves each name (rewards/registry.py), binds its `kwargs` as keyword arguments, checks
them against the function's settings and gives each a `label` for metrics. `score_batch(rewards, prompts,
completions, columns)` calls every function once on the whole batch, all of them at the same time:
    * `async def` functions are awaited on an event loop, with `asyncio.wait_for(timeout)`;
    * other functions run on their own thread (executor "thread"), or in a persistent worker process per
      reward (executor "process"; a function may ask for it with the attribute `reward_executor = "process"`,
      as `math` does). A process that overruns its timeout is killed and replaced; a thread cannot be killed,
      so a timed-out thread is reported and abandoned (use the process executor for functions that may hang).
Each function is called as TRL calls it, everything by keyword: `prompts=`, `completions=`, every data set
column by name, `completion_ids=` / `trainer_state=` when the trainer has them, then the spec's bound settings
(so `def f(completions, solution, **kwargs)` works unchanged); a function without `**kwargs` receives only the
keyword arguments it names. A name that is both a column and a bound setting is an error, never a silent pick.
The process executor resolves the function again by its name in the worker, so it needs a registered name,
module:function or file.py:function (not a function defined at runtime).

Failures -- an exception, a timeout, a result that is not a list of one value per completion (a single number
is never broadcast), or a value that is not a finite number or None -- become a `RewardError` naming the reward,
the sample index where there is one, and what was expected. The spec's `on_error` decides: `raise` (default)
raises it after the batch; `zero` / `none` put 0.0 / None in the failed places (the whole batch for a call
failure, the one sample for a bad value), log a warning and count it in the metrics. Nothing is swallowed.

Combining (`combine`): None means the function abstains for that sample. `abstain="sum"` (default, TRL's
rule, a nansum): total = sum over the functions that did not abstain of weight * value; a sample where all
abstain gets 0.0. `abstain="renormalize"`: the abstaining functions' weight is spread over the others in
proportion to their weights, total = (sum_present w*r) * (sum_all w) / (sum_present w), so a sample scores on
the same scale whether or not a function abstained (meant for positive weights); all abstaining gives 0.0.

Metrics (`reward_metrics`): reward/<label>/mean and /std (population std over the values that are not None),
/abstained (fraction None), /errors (count), /seconds (wall time of the call), and reward/mean, reward/std of
the total. With several processes, each computes its own; gather values first for exact global statistics.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
import math
import pickle
import re
import threading
import time
import traceback
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

from posttrain.configlib import ConfigError, build, field_doc, require

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "zero", "none")
ABSTAIN = ("sum", "renormalize")


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a recipe: which function, its weight in the total, its settings and its failure policy."""

    name: str = field_doc(doc="a registered reward (gsm8k, math, format, overlong, code, exact, ...), "
                              "module:function, or path/to/file.py:function")
    weight: float = field_doc(1.0, "weight in the total reward (0 = computed and logged only)")
    kwargs: dict[str, Any] = field_doc(factory=dict, doc="settings bound to the function as keyword arguments, "
                                       "e.g. {gold_column: solution} for math, {max_length: 1024} for overlong")
    timeout: float | None = field_doc(120.0, "seconds one call on a whole batch may take (null = no limit)")
    on_error: Literal["raise", "zero", "none"] = field_doc("raise", "when the function raises, times out or "
                                                           "returns a bad value: raise (stop training), zero (0.0 in "
                                                           "its place) or none (abstain); always logged and counted")
    executor: Literal["auto", "thread", "process"] = field_doc("auto", "where a plain function runs: its own thread, "
                                                               "or a worker process (killable on timeout); auto = the "
                                                               "function's `reward_executor` attribute, else thread")
    alias: str | None = field_doc(None, "name in metrics and logs (default: the registered name, or the function's "
                                  "name for module:function); needed when two entries use one function")

    def check(self) -> None:
        require(bool(self.name.strip()), "name", "must not be empty")
        require(math.isfinite(self.weight), "weight", f"must be a finite number, got {self.weight}")
        require(self.timeout is None or self.timeout > 0, "timeout", f"must be > 0 seconds or null, got {self.timeout}")
        require(self.alias is None or re.fullmatch(r"[\w.-]+", self.alias) is not None, "alias",
                f"letters, digits, '_', '.', '-' only (it is part of metric names), got {self.alias!r}")


class RewardError(RuntimeError):
    """A reward function failed: `reward` (label), `index` (sample, or None for the whole call), `detail`."""

    def __init__(self, reward: str, detail: str, index: int | None = None):
        self.reward, self.detail, self.index = reward, detail, index
        where = f" at sample {index}" if index is not None else ""
        super().__init__(f"reward {reward!r}{where}: {detail}")


@dataclass
class Reward:
    """A resolved RewardSpec: the function, its bound settings, its metric label and where it runs."""

    spec: RewardSpec
    fn: Callable
    label: str
    executor: str                    # "async" | "thread" | "process"
    accepts: frozenset[str] | None   # keyword names the function takes; None = it takes **kwargs
    _worker: "_Worker | None" = field(default=None, repr=False)

    def close(self) -> None:
        """Stop this reward's worker process, if it has one."""
        if self._worker is not None:
            self._worker.kill()
            self._worker = None


@dataclass
class RewardBatch:
    """Rewards of one batch: the weighted total, each function's values, the reported errors, timings."""

    total: list[float]                                  # [B]
    values: dict[str, list[float | None]]               # label -> [B]; None = abstained
    errors: list[RewardError] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ loading
def build_reward_specs(raw: Any, where: str = "rewards", source: str = "recipe") -> list[RewardSpec]:
    """The `rewards:` list of a recipe as RewardSpecs (ConfigError naming the key on any problem)."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: {where}: expected a list of rewards, got {type(raw).__name__}")
    return [build(RewardSpec, {"name": item} if isinstance(item, str) else item, f"{where}.{i}", source)
            for i, item in enumerate(raw)]


def load_rewards(specs: list[RewardSpec], where: str = "rewards", source: str = "recipe") -> list[Reward]:
    """Resolve and check every spec: the function exists, its settings exist, the labels are unique."""
    import rewards as registry

    out: list[Reward] = []
    for i, spec in enumerate(specs):
        try:
            fn = registry.get(spec.name)
        except (KeyError, ImportError, AttributeError, FileNotFoundError) as e:
            raise ConfigError(f"{source}: {where}.{i}.name: {e.args[0] if e.args else e}") from None
        accepts = _check_settings(fn, spec, f"{where}.{i}", source)
        label = spec.alias or (spec.name if spec.name in registry.REWARDS else getattr(fn, "__name__", "reward"))
        if any(r.label == label for r in out):
            raise ConfigError(f"{source}: {where}.{i}: two rewards would both be logged as {label!r}; give one an alias")
        out.append(Reward(spec, fn, label, _executor(fn, spec), accepts))
    return out


def _check_settings(fn: Callable, spec: RewardSpec, where: str, source: str) -> frozenset[str] | None:
    """Check the function takes TRL's keyword call and that every bound setting is one of its parameters.

    Returns the keyword names it accepts, or None when it takes **kwargs. A function that declares keyword-only
    settings (as the built-ins do) must name every bound setting; one with only **kwargs accepts any.
    """
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if "completions" not in named and not var_kw:
        raise ConfigError(f"{source}: {where}.name: reward {spec.name!r} must accept `completions` by keyword, like a "
                          "TRL reward function fn(prompts, completions, **kwargs); its signature is "
                          f"{inspect.signature(fn)}")
    settings = sorted(n for n, p in params.items() if p.kind is p.KEYWORD_ONLY)
    for key in spec.kwargs:
        if key in ("prompts", "completions") or (key not in named and (settings or not var_kw)):
            allowed = settings or sorted(named - {"prompts", "completions"})
            raise ConfigError(f"{source}: {where}.kwargs.{key}: not a setting of reward {spec.name!r}; its settings: "
                              f"{', '.join(allowed) or 'none'}")
    return None if var_kw else frozenset(named)


def check_reward_inputs(fn: Callable, name: str, settings: dict, columns: dict[str, list], given: tuple[str, ...],
                        where: str, row_name: Callable[[int], str]) -> None:
    """Before training: the reward gets every argument it requires (one of `given`, e.g. prompts / completions, a data
    column or a bound setting), and its data check (rewards.registry.DATA_CHECKS) finds no bad row of `columns`.
    ConfigError naming `where`, the argument or the row (`row_name(i)`) otherwise."""
    from rewards.registry import DATA_CHECKS

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in required if n not in given and n not in columns and n not in settings]
    if missing:
        raise ConfigError(f"{where}: reward {name!r} requires the argument {missing[0]!r}, which is neither a column of "
                          f"the data (its columns: {', '.join(sorted(columns))}) nor a setting in kwargs")
    check = DATA_CHECKS.get(fn)
    problems = check(columns, **settings) if check is not None else []
    if problems:
        row, problem = problems[0]
        more = f" ({len(problems)} rows in all)" if len(problems) > 1 else ""
        raise ConfigError(f"{where}: reward {name!r} cannot score this data: {row_name(row)}: {problem}{more}")


def _executor(fn: Callable, spec: RewardSpec) -> str:
    if inspect.iscoroutinefunction(fn):
        return "async"
    if spec.executor != "auto":
        return spec.executor
    return "process" if getattr(fn, "reward_executor", "thread") == "process" else "thread"


# ------------------------------------------------------------------------------------------ scoring
def score_batch(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list] | None = None,
                *, completion_ids: list[list[int]] | None = None, trainer_state: Any = None,
                abstain: str = "sum", log_errors: bool = True) -> RewardBatch:
    """Run every reward on the batch concurrently and combine them (see the module doc). Blocking."""
    coro = ascore_batch(rewards, prompts, completions, columns, completion_ids=completion_ids,
                        trainer_state=trainer_state, abstain=abstain, log_errors=log_errors)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}                                     # called from inside an event loop: run on a fresh one
    thread = threading.Thread(target=lambda: box.update(out=_capture(asyncio.run, coro)), daemon=True)
    thread.start()
    thread.join()
    ok, value = box["out"]
    if not ok:
        raise value
    return value


async def ascore_batch(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list] | None = None,
                       *, completion_ids: list[list[int]] | None = None, trainer_state: Any = None,
                       abstain: str = "sum", log_errors: bool = True) -> RewardBatch:
    """`score_batch` for callers that already run an event loop (`log_errors=False`: the caller reports them)."""
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"score_batch: {len(prompts)} prompts for {n} completions")
    columns = dict(columns or {})
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"score_batch: column {name!r} has {len(col)} values for {n} completions")
    extra = {k: v for k, v in (("completion_ids", completion_ids), ("trainer_state", trainer_state)) if v is not None}
    outcomes = await asyncio.gather(*(_run_one(r, prompts, completions, columns, extra) for r in rewards))
    values, errors, raised, seconds = {}, [], [], {}
    for reward, (vals, errs, secs) in zip(rewards, outcomes):
        values[reward.label], seconds[reward.label] = vals, secs
        for err in errs:
            (raised if reward.spec.on_error == "raise" else errors).append(err)
            if reward.spec.on_error != "raise" and log_errors:
                log.warning("%s (on_error=%s: %s used)", err, reward.spec.on_error,
                            "0.0" if reward.spec.on_error == "zero" else "None")
    if raised:
        more = f" (and {len(raised) - 1} more: " + "; ".join(str(e) for e in raised[1:4]) + ")" if len(raised) > 1 else ""
        raise RewardError(raised[0].reward, raised[0].detail + more, raised[0].index)
    total = combine(values, {r.label: r.spec.weight for r in rewards}, abstain)
    return RewardBatch(total, values, errors, seconds)


async def _run_one(reward: Reward, prompts, completions, columns, extra) -> tuple[list, list[RewardError], float]:
    """One reward on the batch: call with a timeout, validate, apply on_error. Returns (values, errors, seconds)."""
    n, start, timeout = len(completions), time.perf_counter(), reward.spec.timeout
    try:
        kwargs = _call_kwargs(reward, prompts, completions, columns, extra)
        if reward.executor == "async":
            raw = await asyncio.wait_for(reward.fn(**kwargs), timeout)
        elif reward.executor == "process":
            if reward._worker is None or reward._worker.dead:
                reward._worker = _Worker()
            worker = reward._worker
            raw = await _in_thread(worker.call, reward.spec, kwargs, timeout)
        else:
            raw = await asyncio.wait_for(_in_thread(reward.fn, **kwargs), timeout)
        values, errors = _validate(reward.label, raw, n)
    except (asyncio.TimeoutError, TimeoutError):
        hint = "" if reward.executor != "thread" else "; its thread is abandoned (executor: process kills it instead)"
        values, errors = None, [RewardError(reward.label, f"timed out after {timeout}s on a batch of {n} "
                                                          f"completions{hint}")]
    except RewardError as e:
        values, errors = None, [e]
    except _WorkerFailed as e:
        values, errors = None, [RewardError(reward.label, str(e))]
    except Exception as e:  # noqa: BLE001  (reported with where it was raised, never swallowed)
        values, errors = None, [RewardError(reward.label, _raised(e))]
    fill = 0.0 if reward.spec.on_error == "zero" else None
    if values is None:
        values = [fill] * n
    for err in errors:
        if err.index is not None:
            values[err.index] = fill
    return values, errors, time.perf_counter() - start


def _call_kwargs(reward: Reward, prompts: list, completions: list, columns: dict, extra: dict) -> dict:
    """TRL's call: everything by keyword (so `def f(completions, **kwargs)` works), settings bound last."""
    bound = reward.spec.kwargs
    clash = sorted((set(bound) & (set(columns) | set(extra))) | (set(columns) & {"prompts", "completions"}))
    if clash:
        raise RewardError(reward.label, f"the name {clash[0]!r} is both a data column and a reward argument "
                                        "(a bound setting, prompts or completions); rename the column")
    kwargs = {"prompts": prompts, "completions": completions, **columns, **extra, **bound}
    if reward.accepts is not None:               # no **kwargs: pass only what the function names
        kwargs = {k: v for k, v in kwargs.items() if k in reward.accepts}
    return kwargs


def _validate(label: str, raw: Any, n: int) -> tuple[list[float | None], list[RewardError]]:
    """One finite float or None per completion; anything else is a RewardError (never broadcast or guessed)."""
    if hasattr(raw, "tolist") and not isinstance(raw, (list, tuple)):
        raw = raw.tolist()                        # numpy arrays, torch tensors
    if not isinstance(raw, (list, tuple)):
        raise RewardError(label, f"returned {type(raw).__name__} {_short(raw)}, expected a list of {n} values, one per "
                                 "completion (a single value is never broadcast)")
    if len(raw) != n:
        raise RewardError(label, f"returned {len(raw)} values for {n} completions (expected one per completion)")
    values: list[float | None] = []
    errors: list[RewardError] = []
    for i, v in enumerate(raw):
        if v is None:
            values.append(None)
            continue
        try:
            f = float(v)
        except (TypeError, ValueError):
            errors.append(RewardError(label, f"returned {type(v).__name__} {_short(v)}, expected a number or None", i))
            values.append(None)
            continue
        if not math.isfinite(f):
            errors.append(RewardError(label, f"returned {f}, expected a finite number or None", i))
        values.append(f)
    return values, errors


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def combine(values: dict[str, list[float | None]], weights: dict[str, float], abstain: str = "sum") -> list[float]:
    """Weighted total per sample; None abstains (see the module doc for `sum` and `renormalize`).

    >>> combine({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 1.0, "b": 0.5})
    [1.25, 0.5, 0.0]
    >>> combine({"a": [1.0, None, None], "b": [0.5, 1.0, None]}, {"a": 1.0, "b": 0.5}, abstain="renormalize")
    [1.25, 1.5, 0.0]
    """
    if abstain not in ABSTAIN:
        raise ValueError(f"abstain must be one of {', '.join(ABSTAIN)}, got {abstain!r}")
    if not values:
        return []
    n = len(next(iter(values.values())))
    full = sum(weights[k] for k in values)
    total = []
    for i in range(n):
        present = [(weights[k], v[i]) for k, v in values.items() if v[i] is not None]
        s = sum(w * r for w, r in present)
        if abstain == "renormalize" and present:
            part = sum(w for w, _ in present)
            s = s * full / part if part else 0.0
        total.append(float(s))
    return total


def reward_metrics(batch: RewardBatch, prefix: str = "reward") -> dict[str, float]:
    """reward/<label>/{mean,std,abstained,errors,seconds} and reward/{mean,std}.

    >>> m = reward_metrics(RewardBatch([1.0, 0.0], {"gsm8k": [1.0, None]}))
    >>> m["reward/gsm8k/mean"], m["reward/gsm8k/abstained"], m["reward/mean"], m["reward/std"]
    (1.0, 0.5, 0.5, 0.5)
    """
    out: dict[str, float] = {}
    for label, vals in batch.values.items():
        present = [v for v in vals if v is not None]
        mean, std = _mean_std(present)
        out[f"{prefix}/{label}/mean"], out[f"{prefix}/{label}/std"] = mean, std
        out[f"{prefix}/{label}/abstained"] = (len(vals) - len(present)) / len(vals) if vals else 0.0
        out[f"{prefix}/{label}/errors"] = float(sum(e.reward == label for e in batch.errors))
        if label in batch.seconds:
            out[f"{prefix}/{label}/seconds"] = batch.seconds[label]
    out[f"{prefix}/mean"], out[f"{prefix}/std"] = _mean_std(batch.total)
    return out


def _mean_std(xs: list[float]) -> tuple[float, float]:
    if not xs:
        return math.nan, math.nan
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


# ------------------------------------------------------------------------------------------ checking a data set
def check_reward(spec: RewardSpec, prompts: list, completions: list, columns: dict[str, list],
                 batch_size: int = 64) -> dict:
    """Score a whole data set with one reward (in batches; errors counted, not raised) and summarise it.

    A batch whose call fails as a whole is scored again one sample at a time, so the errors land on the
    samples that cause them.

    >>> s = check_reward(RewardSpec("gsm8k"), ["q"] * 3, ["#### 4", "#### 5", "no"], {"answer": ["#### 4"] * 3})
    >>> s["count"], s["mean"], s["histogram"]
    (3, 0.3333333333333333, [[0.0, 2], [1.0, 1]])
    """
    import dataclasses
    from collections import Counter

    reward = load_rewards([dataclasses.replace(spec, on_error="none")], "reward", "command line")[0]
    values: list[float | None] = []
    failed: set[int] = set()
    messages: Counter = Counter()

    def run(lo: int, hi: int, size: int) -> None:
        batch = score_batch([reward], prompts[lo:hi], completions[lo:hi], {k: v[lo:hi] for k, v in columns.items()},
                            log_errors=False)
        if size > 1 and any(err.index is None for err in batch.errors):
            for i in range(lo, hi):
                run(i, i + 1, 1)
            return
        values.extend(batch.values[reward.label])
        for err in batch.errors:
            failed.update(range(lo, hi) if err.index is None else [lo + err.index])
            messages[err.detail.splitlines()[0][:200]] += 1

    try:
        for lo in range(0, len(completions), batch_size):
            run(lo, min(lo + batch_size, len(completions)), batch_size)
    finally:
        reward.close()
    return _summary(reward.label, values, failed, messages)


def _summary(label: str, values: list[float | None], failed: set[int], messages) -> dict:
    scored = [v for i, v in enumerate(values) if v is not None and i not in failed]
    mean, std = _mean_std(scored)
    distinct = sorted(set(scored))
    if len(distinct) <= 10:
        histogram = [[v, scored.count(v)] for v in distinct]
    else:
        lo, hi = distinct[0], distinct[-1]
        width = (hi - lo) / 10
        counts = [0] * 10
        for v in scored:
            counts[min(int((v - lo) / width), 9)] += 1
        histogram = [[f"[{lo + k * width:.4g}, {lo + (k + 1) * width:.4g}{']' if k == 9 else ')'}", c]
                     for k, c in enumerate(counts)]
    return {"reward": label, "count": len(values), "scored": len(scored), "mean": mean, "std": std,
            "min": min(scored) if scored else math.nan, "max": max(scored) if scored else math.nan,
            "abstained": sum(v is None for i, v in enumerate(values) if i not in failed), "errors": len(failed),
            "histogram": histogram, "error_messages": [[m, c] for m, c in messages.most_common(5)]}


def format_summary(s: dict) -> str:
    """The `posttrain rewards check` report."""
    lines = [f"reward {s['reward']}: {s['count']} completions, {s['scored']} scored, {s['abstained']} abstained, "
             f"{s['errors']} errors",
             f"  mean {s['mean']:.4f}  std {s['std']:.4f}  min {s['min']:.4g}  max {s['max']:.4g}",
             "  histogram:"]
    peak = max([c for _, c in s["histogram"]] or [1])
    for value, count in s["histogram"]:
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        lines.append(f"    {shown:>20}  {count:6d}  {'#' * max(1 if count else 0, round(40 * count / peak))}")
    for message, count in s["error_messages"]:
        lines.append(f"  error x{count}: {message}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ threads, processes
def _capture(fn: Callable, *args, **kwargs) -> tuple[bool, Any]:
    try:
        return True, fn(*args, **kwargs)
    except BaseException as e:  # noqa: BLE001  (handed to the waiting side)
        return False, e


def _in_thread(fn: Callable, *args, **kwargs) -> asyncio.Future:
    """Run `fn` on a fresh daemon thread (a hung call then never blocks later ones) and await its result."""
    fut: Future = Future()

    def target():
        ok, value = _capture(fn, *args, **kwargs)
        if fut.set_running_or_notify_cancel():
            fut.set_result(value) if ok else fut.set_exception(value)

    threading.Thread(target=target, daemon=True, name="reward").start()
    return asyncio.wrap_future(fut)


class _WorkerFailed(Exception):
    """The reward's worker process reported an exception of the function, or died, or could not be reached."""


def _raised(e: BaseException) -> str:
    """`raised ValueError: msg (at file.py:12 in fn)`: the exception and the innermost frame that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"raised {type(e).__name__}: {e}{where}"


class _Worker:
    """A persistent worker process that runs one reward's calls; killed (and later respawned) on a timeout.

    A plain `python -m posttrain.rewarding --worker FD` subprocess talking over a socket pair: unlike
    multiprocessing's spawn/forkserver it never re-imports the trainer's main script, and unlike fork it never
    copies a trainer holding threads and CUDA state. It inherits the environment, cwd and stderr.
    """

    def __init__(self):
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "posttrain.rewarding", "--worker", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.Lock()
        self.dead = False

    def call(self, spec: RewardSpec, kwargs: dict, timeout: float | None):
        with self._lock:
            if self.dead:
                raise _WorkerFailed("its worker process was stopped")
            try:
                payload = pickle.dumps((spec.name, kwargs))
            except Exception as e:  # noqa: BLE001
                raise _WorkerFailed(f"cannot send the batch to its worker process ({type(e).__name__}: {e}); "
                                    "use executor: thread for arguments that do not pickle") from None
            try:
                self._conn.send_bytes(payload)
                answered = self._conn.poll(timeout)
                reply = self._conn.recv_bytes() if answered else None
            except (EOFError, OSError):
                self.kill()
                raise _WorkerFailed(f"its worker process died (exit code {self._proc.returncode})") from None
            if reply is None:
                self.kill()                               # the only way to stop a runaway call
                raise TimeoutError
        status, value = pickle.loads(reply)
        if status == "error":
            raise _WorkerFailed(f"{value} (in its worker process)")
        return value

    def kill(self) -> None:
        self.dead = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._conn.close()


def _worker_main(fd: int) -> None:
    """Worker process loop: receive (name, kwargs), call, send ("ok", values) or ("error", text)."""
    from multiprocessing.connection import Connection

    import rewards as registry

    conn = Connection(fd)
    while True:
        try:
            name, kwargs = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            result = registry.get(name)(**kwargs)
            if inspect.isawaitable(result):
                result = asyncio.run(result)
            if hasattr(result, "tolist") and not isinstance(result, (list, tuple)):
                result = result.tolist()
            reply = pickle.dumps(("ok", result))
        except BaseException as e:  # noqa: BLE001  (reported to the trainer)
            reply = pickle.dumps(("error", _raised(e)))
        conn.send_bytes(reply)


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--worker"]:
        _worker_main(int(sys.argv[2]))
