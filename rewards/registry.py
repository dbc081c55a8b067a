"""Reward lookup: a registered name, `module:function`, or `path/to/file.py:function`.

A reward is a plain function with TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`
(None = abstains for that sample), so users' TRL reward functions run unchanged.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Callable

from posttrain.registry import Registry

RewardFn = Callable[..., list]
REWARDS: Registry[RewardFn] = Registry("reward")


def register(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: `@rewards.register("my_reward")`."""
    return REWARDS.register(name)


def get(spec: str) -> RewardFn:
    """The reward function named by `spec` (registry name, module:function or file.py:function)."""
    if spec in REWARDS:
        return REWARDS.get(spec)
    if ":" not in spec:
        raise KeyError(f"unknown reward {spec!r}; registered: {', '.join(REWARDS.names())}; "
                       "or name a function as module:function or path/to/file.py:function")
    target, _, attr = spec.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise FileNotFoundError(f"reward {spec!r}: file {target!r} not found")
        mod_spec = importlib.util.spec_from_file_location(f"posttrain_user_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ImportError(f"reward {spec!r}: cannot import module {target!r}: {e}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise AttributeError(f"reward {spec!r}: {target!r} has no function {attr!r}")
    return fn
