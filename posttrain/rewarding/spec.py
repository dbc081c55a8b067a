"""One reward of a recipe (`RewardSpec`) and the `rewards:` list as specs."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.configlib import ConfigError, build, field_doc, require


@dataclass(frozen=True)
class RewardSpec:
    """One reward of a recipe: which function, its weight in the total, its settings and its failure policy."""

    name: str = field_doc(doc="a registered reward (gsm8k, math, format, overlong, code, exact, ...), "
                              "module:function, or path/to/file.py:function")
    weight: float = field_doc(1.0, "weight in the total reward (0 = computed and logged only)")
    kwargs: dict[str, Any] = field_doc(factory=dict, doc="settings bound to the function as keyword arguments, "
                                       "e.g. {gold_column: solution} for math, {max_length: 1024} for overlong")
    factory: dict[str, Any] | None = field_doc(None, "when `name` is a factory that returns the reward function "
                                               "(e.g. trl.rewards:get_cosine_scaled_reward), the arguments it is "
                                               "called with once at load time ({} = its defaults); null = `name` "
                                               "is the reward function itself")
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


def build_reward_specs(raw: Any, where: str = "rewards", source: str = "recipe") -> list[RewardSpec]:
    """The `rewards:` list of a recipe as RewardSpecs (ConfigError naming the key on any problem)."""
    if not isinstance(raw, list):
        raise ConfigError(f"{source}: {where}: expected a list of rewards, got {type(raw).__name__}")
    return [build(RewardSpec, {"name": item} if isinstance(item, str) else item, f"{where}.{i}", source)
            for i, item in enumerate(raw)]
