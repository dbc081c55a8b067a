"""Reward lookup: a registered name, `module:function`, or `path/to/file.py:function`.

A reward is a plain function with TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`
(None = abstains for that sample), so users' TRL reward functions run unchanged. Besides the data set's columns,
the trainer passes `completion_ids` (token ids per completion) by keyword, so a reward should accept `**kwargs`.
A function may set the attribute `reward_executor = "process"` to ask posttrain's reward execution
(posttrain/rewarding/executors.py) for a worker process instead of a thread by default.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import sys
import threading
import traceback
from pathlib import Path
from typing import Callable

from posttrain.registry import Registry

RewardFn = Callable[..., list]
REWARDS: Registry[RewardFn] = Registry("reward")
# reward function -> its data check: check(columns: {name: [values]}, **the reward's settings) -> [(row, problem)],
# run on a stage's whole data set before training (posttrain/preflight.py), e.g. gold answers the reward cannot read.
DATA_CHECKS: dict[RewardFn, Callable[..., list[tuple[int, str]]]] = {}
_file_lock = threading.Lock()


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: `@posttrain.rewards.register("my_reward")`."""
    return REWARDS.register(name)


def data_check(reward: RewardFn) -> Callable:
    """Decorator: register the function below as `reward`'s data check (see DATA_CHECKS)."""

    def add(check: Callable) -> Callable:
        DATA_CHECKS[reward] = check
        return check

    return add


def get(spec: str) -> RewardFn:
    """The reward function named by `spec` (registry name, module:function or file.py:function).

    >>> get("gsm8k").__name__, get("posttrain.rewards.numeric:gsm8k") is get("gsm8k")
    ('gsm8k', True)
    """
    if spec in REWARDS:
        return REWARDS.get(spec)
    if ":" not in spec:
        raise KeyError(f"unknown reward {spec!r}; registered: {', '.join(REWARDS.names())}; "
                       "or name a function as module:function or path/to/file.py:function")
    target, _, attr = spec.rpartition(":")
    module = _load_file(spec, target) if target.endswith(".py") else _import(spec, target)
    fn = getattr(module, attr, None)
    if fn is not None and not callable(fn):
        raise AttributeError(f"reward {spec!r}: {attr!r} in {target!r} is a {type(fn).__name__}, not a function")
    if not callable(fn):
        found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        raise AttributeError(f"reward {spec!r}: {target!r} has no function {attr!r}"
                             + (f"; its functions: {', '.join(found)}" if found else ""))
    return fn


def _import(spec: str, target: str):
    try:
        return importlib.import_module(target)
    except ImportError as e:
        raise ImportError(f"reward {spec!r}: cannot import module {target!r}: {e}") from None
    except SyntaxError as e:
        raise ImportError(f"reward {spec!r}: {e.filename} line {e.lineno}: {e.msg}") from None


def _load_file(spec: str, target: str):
    """Import a .py file once per resolved path, under a unique module name registered in sys.modules."""
    path = Path(target).expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward {spec!r}: file {target!r} not found (from {Path.cwd()})")
    name = f"posttrain_user_reward_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
    with _file_lock:
        if name in sys.modules:
            return sys.modules[name]
        mod_spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[name] = module
        try:
            mod_spec.loader.exec_module(module)
        except SyntaxError as e:
            del sys.modules[name]
            raise ImportError(f"reward {spec!r}: {target} line {e.lineno}: {e.msg}") from None
        except Exception as e:  # noqa: BLE001  (the file's own code failed while it was imported)
            del sys.modules[name]
            line = next((f.lineno for f in reversed(traceback.extract_tb(e.__traceback__)) if f.filename == str(path)),
                        None)
            raise ImportError(f"reward {spec!r}: importing {target} raised {type(e).__name__}: {e}"
                              + (f" (line {line})" if line else "")) from None
        except BaseException:
            del sys.modules[name]
            raise
    return module
