"""From RewardSpecs to callable rewards: resolve each name, call a factory, check the settings, label the metrics.

A name is a registered reward (posttrain.rewards), `module:function` or `path/to/file.py:function`. With
`factory:` the named function is a factory (TRL's `get_cosine_scaled_reward`, `get_repetition_penalty_reward`,
`get_soft_overlong_punishment`, or a user's): it is called once with those arguments, checked against its
signature first, and what it returns is the reward. Every problem is a ConfigError naming the recipe key.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from posttrain.configlib import ConfigError
from posttrain.rewarding.spec import RewardSpec

if TYPE_CHECKING:
    from posttrain.rewarding.executors import Worker


@dataclass
class Reward:
    """A resolved RewardSpec: the function, its bound settings, its metric label and where it runs."""

    spec: RewardSpec
    fn: Callable
    label: str
    executor: str                    # "async" | "thread" | "process"
    accepts: frozenset[str] | None   # keyword names the function takes; None = it takes **kwargs
    worker: Worker | None = field(default=None, repr=False)

    def close(self) -> None:
        """Stop this reward's worker process, if it has one."""
        if self.worker is not None:
            self.worker.kill()
            self.worker = None


def load_rewards(specs: list[RewardSpec], where: str = "rewards", source: str = "recipe") -> list[Reward]:
    """Resolve and check every spec: the function exists, its settings exist, the labels are unique."""
    out: list[Reward] = []
    for i, spec in enumerate(specs):
        reward = load_reward(spec, f"{where}.{i}", source)
        if any(r.label == reward.label for r in out):
            raise ConfigError(f"{source}: {where}.{i}: two rewards would both be logged as {reward.label!r}; give one "
                              "an alias")
        out.append(reward)
    return out


def load_reward(spec: RewardSpec, where: str = "reward", source: str = "recipe") -> Reward:
    """One spec resolved and checked; `where` is its key path, named in errors."""
    from posttrain.rewards import REWARDS

    fn = resolve(spec, where, source)
    accepts = _check_settings(fn, spec, where, source)
    label = spec.alias or (spec.name if spec.name in REWARDS else getattr(fn, "__name__", "reward"))
    return Reward(spec, fn, label, _executor(fn, spec), accepts)


def resolve(spec: RewardSpec, where: str = "reward", source: str = "recipe") -> Callable:
    """The reward function of `spec`: the named function, or what its factory returns for `spec.factory`."""
    from posttrain import rewards as registry

    try:
        fn = registry.get(spec.name)
    except (KeyError, ImportError, AttributeError, FileNotFoundError) as e:
        raise ConfigError(f"{source}: {where}.name: {e.args[0] if e.args else e}") from None
    if spec.factory is None:
        return fn
    _check_factory_args(fn, spec, f"{where}.factory", source)
    try:
        made = fn(**spec.factory)
    except Exception as e:  # noqa: BLE001  (the factory rejected its arguments: say which call, and why)
        raise ConfigError(f"{source}: {where}.factory: {spec.name}(**{spec.factory}) raised {type(e).__name__}: "
                          f"{e}") from None
    if not callable(made):
        raise ConfigError(f"{source}: {where}.factory: {spec.name!r} returned {type(made).__name__}, not a reward "
                          "function; without `factory:` the named function itself is the reward")
    return made


def _check_factory_args(factory: Callable, spec: RewardSpec, where: str, source: str) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for key in spec.factory:
        if key not in named and not var_kw:
            raise ConfigError(f"{source}: {where}.{key}: not an argument of factory {spec.name!r}; its arguments: "
                              f"{', '.join(named) or 'none'}")
    missing = [n for n in named if params[n].default is inspect.Parameter.empty and n not in spec.factory]
    if missing:
        raise ConfigError(f"{source}: {where}: factory {spec.name!r} needs {', '.join(missing)} (no default); "
                          f"its signature is {inspect.signature(factory)}")


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
        hint = "" if spec.factory is not None else (" (if it is a factory that returns the reward function, give its "
                                                     "arguments under `factory:`)")
        raise ConfigError(f"{source}: {where}.name: reward {spec.name!r} must accept `completions` by keyword, like a "
                          "TRL reward function fn(prompts, completions, **kwargs); its signature is "
                          f"{inspect.signature(fn)}{hint}")
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
    column or a bound setting), and its data check (posttrain.rewards.registry.DATA_CHECKS) finds no bad row of
    `columns`. ConfigError naming `where`, the argument or the row (`row_name(i)`) otherwise."""
    from posttrain.rewards.registry import DATA_CHECKS

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        params = []
    required = [p.name for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [n for n in required if n not in given and n not in columns and n not in settings]
    if missing:
        raise ConfigError(f"{where}: reward {name!r} requires the argument {missing[0]!r}, which is neither a column "
                          "of "
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
