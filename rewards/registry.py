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
from pathlib import Path
from typing import Callable

from posttrain.registry import Registry

RewardFn = Callable[..., list]
REWARDS: Registry[RewardFn] = Registry("reward")
_file_lock = threading.Lock()


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: `@posttrain.rewards.register("my_reward")`."""
    return REWARDS.register(name)


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
        except BaseException:
            del sys.modules[name]
            raise
    return module
