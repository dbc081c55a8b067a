"""Running rewards on a batch: all at once, each call bounded in time, every result validated, every failure reported.

`score_batch(rewards, prompts, completions, columns)` calls every function once on the whole batch, all of them at
the same time:
    * `async def` functions are awaited on an event loop, with `asyncio.wait_for(timeout)`;
    * other functions run on their own thread (executor "thread"), or in a persistent worker process per reward
      (executor "process"; a function may ask for it with the attribute `reward_executor = "process"`, as `math`
      does). A process that overruns its timeout is killed and replaced; a thread cannot be killed, so a timed-out
      thread is reported and abandoned (use the process executor for functions that may hang).
Each function is called as TRL calls it, everything by keyword: `prompts=`, `completions=`, every data set column by
name, `completion_ids=` when the caller has them, then the spec's bound settings (so `def f(completions, solution,
**kwargs)` works unchanged); a function without `**kwargs` receives only the keyword arguments it names. A name
that is both a column and a bound setting is an error, never a silent pick. The process executor resolves the
function again from its spec in the worker, so it needs a registered name, module:function or file.py:function
(not a function defined at runtime).

Failures -- an exception, a timeout, a result that is not a list of one value per completion (a single number is
never broadcast), or a value that is not a finite number or None -- become a `RewardError` naming the reward, the
sample index where there is one, and what was expected. The spec's `on_error` decides: `raise` (default) raises
it after the batch; `zero` / `none` put 0.0 / None in the failed places (the whole batch for a call failure, the
one sample for a bad value), log a warning and count it in the metrics. Nothing is swallowed.
"""
from __future__ import annotations

import asyncio
import logging
import math
import pickle
import threading
import time
import traceback
from concurrent.futures import Future
from typing import Any, Callable

from posttrain.rewarding.combining import RewardBatch, combine
from posttrain.rewarding.loading import Reward
from posttrain.rewarding.spec import RewardSpec

log = logging.getLogger(__name__)


class RewardError(RuntimeError):
    """A reward function failed: `reward` (label), `index` (sample, or None for the whole call), `detail`."""

    def __init__(self, reward: str, detail: str, index: int | None = None):
        self.reward, self.detail, self.index = reward, detail, index
        where = f" at sample {index}" if index is not None else ""
        super().__init__(f"reward {reward!r}{where}: {detail}")


def score_batch(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list] | None = None,
                *, completion_ids: list[list[int]] | None = None, log_errors: bool = True) -> RewardBatch:
    """Run every reward on the batch concurrently and combine them (see the module doc). Blocking.

    `log_errors=False`: the caller reports the errors of `on_error: zero / none` rewards itself."""
    coro = _score(rewards, prompts, completions, columns, completion_ids, log_errors)
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


async def _score(rewards: list[Reward], prompts: list, completions: list, columns: dict[str, list] | None,
                 completion_ids: list[list[int]] | None, log_errors: bool) -> RewardBatch:
    n = len(completions)
    if len(prompts) != n:
        raise ValueError(f"score_batch: {len(prompts)} prompts for {n} completions")
    columns = dict(columns or {})
    for name, col in columns.items():
        if len(col) != n:
            raise ValueError(f"score_batch: column {name!r} has {len(col)} values for {n} completions")
    extra = {"completion_ids": completion_ids} if completion_ids is not None else {}
    outcomes = await asyncio.gather(*(_run_one(r, prompts, completions, columns, extra) for r in rewards))
    values, errors, fatal, seconds = {}, [], [], {}
    for reward, (vals, errs, secs) in zip(rewards, outcomes):
        values[reward.label], seconds[reward.label] = vals, secs
        for err in errs:
            (fatal if reward.spec.on_error == "raise" else errors).append(err)
            if reward.spec.on_error != "raise" and log_errors:
                log.warning("%s (on_error=%s: %s used)", err, reward.spec.on_error,
                            "0.0" if reward.spec.on_error == "zero" else "None")
    if fatal:
        more = f" (and {len(fatal) - 1} more: " + "; ".join(str(e) for e in fatal[1:4]) + ")" if len(fatal) > 1 else ""
        raise RewardError(fatal[0].reward, fatal[0].detail + more, fatal[0].index)
    total = combine(values, {r.label: r.spec.weight for r in rewards})
    return RewardBatch(total, values, errors, seconds)


async def _run_one(reward: Reward, prompts, completions, columns, extra) -> tuple[list, list[RewardError], float]:
    """One reward on the batch: call with a timeout, validate, apply on_error. Returns (values, errors, seconds)."""
    n, start, timeout = len(completions), time.perf_counter(), reward.spec.timeout
    try:
        kwargs = _call_kwargs(reward, prompts, completions, columns, extra)
        if reward.executor == "async":
            raw = await asyncio.wait_for(reward.fn(**kwargs), timeout)
        elif reward.executor == "process":
            if reward.worker is None or reward.worker.dead:
                reward.worker = Worker()
            raw = await _in_thread(reward.worker.call, reward.spec, kwargs, timeout)
        else:
            raw = await asyncio.wait_for(_in_thread(reward.fn, **kwargs), timeout)
        values, errors = _validate(reward.label, raw, n)
    except (asyncio.TimeoutError, TimeoutError):
        hint = "" if reward.executor != "thread" else "; its thread is abandoned (executor: process kills it instead)"
        values, errors = None, [RewardError(reward.label, f"timed out after {timeout}s on a batch of {n} "
                                                          f"completions{hint}")]
    except RewardError as e:
        values, errors = None, [e]
    except WorkerFailed as e:
        values, errors = None, [RewardError(reward.label, str(e))]
    except Exception as e:  # noqa: BLE001  (reported with where it was raised, never swallowed)
        values, errors = None, [RewardError(reward.label, raised(e))]
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


class WorkerFailed(Exception):
    """The reward's worker process reported an exception of the function, or died, or could not be reached."""


def raised(e: BaseException) -> str:
    """`raised ValueError: msg (at file.py:12 in fn)`: the exception and the innermost frame that raised it."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    return f"raised {type(e).__name__}: {e}{where}"


class Worker:
    """A persistent worker process that runs one reward's calls; killed (and later respawned) on a timeout.

    A plain `python -m posttrain.rewarding.worker FD` subprocess talking over a socket pair: unlike
    multiprocessing's spawn/forkserver it never re-imports the trainer's main script, and unlike fork it never
    copies a trainer holding threads and CUDA state. It inherits the environment, cwd and stderr.
    """

    def __init__(self):
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        mine, theirs = socket.socketpair()
        self._proc = subprocess.Popen([sys.executable, "-m", "posttrain.rewarding.worker", str(theirs.fileno())],
                                      pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
        theirs.close()
        self._conn = Connection(mine.detach())
        self._lock = threading.Lock()
        self.dead = False

    def call(self, spec: RewardSpec, kwargs: dict, timeout: float | None):
        with self._lock:
            if self.dead:
                raise WorkerFailed("its worker process was stopped")
            try:
                payload = pickle.dumps((spec, kwargs))
            except Exception as e:  # noqa: BLE001
                raise WorkerFailed(f"cannot send the batch to its worker process ({type(e).__name__}: {e}); "
                                   "use executor: thread for arguments that do not pickle") from None
            try:
                self._conn.send_bytes(payload)
                answered = self._conn.poll(timeout)
                reply = self._conn.recv_bytes() if answered else None
            except (EOFError, OSError):
                self.kill()
                raise WorkerFailed(f"its worker process died (exit code {self._proc.returncode})") from None
            if reply is None:
                self.kill()                               # the only way to stop a runaway call
                raise TimeoutError
        status, value = pickle.loads(reply)
        if status == "error":
            raise WorkerFailed(f"{value} (in its worker process)")
        return value

    def kill(self) -> None:
        self.dead = True
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._conn.close()
