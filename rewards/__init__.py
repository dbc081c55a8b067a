"""Verifiable reward functions, the package `posttrain.rewards` (`from posttrain.rewards import gsm8k`).

The files live in the repository's top-level `rewards/` directory, installed as the package `posttrain.rewards`
(pyproject.toml `package-dir`); a top-level `rewards` package is not installed.

Built-ins (each a plain function with TRL's signature, settings as keyword arguments a recipe binds):
    exact     exact match of the final answer (synthetic tasks)          rewards/exact_match.py
    steps     every step of an arithmetic chain shown and correct         rewards/chain.py
    gsm8k     numeric match of the final answer, GSM8K's `#### N`        rewards/numeric.py
    math      equivalence by math-verify (LaTeX, fractions, sets, ...)   rewards/math_equiv.py
    format    a tag layout such as <think>...</think><answer>...</answer> rewards/tags.py
    overlong  DAPO's soft overlong punishment (alias: length)            rewards/length_penalty.py
    code      fraction of assert tests passed, run in the sandbox        rewards/code_tests.py, rewards/sandbox.py
Running them on a batch (concurrency, timeouts, errors, weights, metrics): posttrain/rewarding/.
"""
from posttrain.rewards.chain import steps
from posttrain.rewards.code_tests import code
from posttrain.rewards.exact_match import exact
from posttrain.rewards.length_penalty import length, overlong
from posttrain.rewards.math_equiv import math
from posttrain.rewards.numeric import gsm8k
from posttrain.rewards.registry import REWARDS, get, register
from posttrain.rewards.tags import format

__all__ = ["REWARDS", "get", "register", "exact", "steps", "gsm8k", "math", "format", "overlong", "length", "code"]
