"""A synthetic verifiable task: left-to-right arithmetic chains with a difficulty knob.

`digits` bounds each operand (numbers below 10**digits), `num_ops` is the number of operations in the chain and
`ops` the operators drawn from. The demonstration writes one partial result per line and ends with `#### answer`,
the same answer format as GSM8K, so the `exact` and `gsm8k` rewards both verify it.

Train and test are disjoint by construction: a problem belongs to the test split iff a stable hash of its text
falls in the test bucket, whatever seed or size generated it.
"""
from __future__ import annotations

import hashlib
import operator
import random
from dataclasses import dataclass
from typing import Literal

from posttrain.configlib import field_doc, require

OPERATORS = {"+": operator.add, "-": operator.sub, "*": operator.mul}   # also what rewards/chain.py verifies


@dataclass(frozen=True)
class ArithmeticConfig:
    """Settings of the synthetic arithmetic task."""

    digits: int = field_doc(2, "operands are drawn from [0, 10**digits)")
    num_ops: int = field_doc(1, "operations per problem (chain length)")
    ops: str = field_doc("+-", "operators to draw from, any of '+-*'")
    num_examples: int = field_doc(20000, "problems to generate")
    seed: int = field_doc(0, "generator seed")
    test_fraction: float = field_doc(0.1, "fraction of the problem space reserved for the test split")
    split: Literal["train", "test"] = field_doc("train", "which side of the fixed hash split to draw from")

    def check(self) -> None:
        require(1 <= self.digits <= 9, "digits", f"must be in 1..9, got {self.digits}")
        require(1 <= self.num_ops <= 8, "num_ops", f"must be in 1..8, got {self.num_ops}")
        require(bool(self.ops) and set(self.ops) <= set(OPERATORS), "ops",
                f"must be a non-empty subset of '+-*', got {self.ops!r}")
        require(self.num_examples >= 1, "num_examples", f"must be >= 1, got {self.num_examples}")
        require(0.0 < self.test_fraction < 1.0, "test_fraction", f"must be in (0, 1), got {self.test_fraction}")


def _in_test(question: str, fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:8], "big") / 2**64
    return bucket < fraction


def make_problem(rng: random.Random, cfg: ArithmeticConfig) -> dict:
    """One problem: `question`, step-by-step `solution` (the demonstration), gold `answer`."""
    hi = 10**cfg.digits
    value = rng.randrange(hi)
    expr, lines = str(value), []
    for _ in range(cfg.num_ops):
        op, operand = rng.choice(cfg.ops), rng.randrange(hi)
        new = OPERATORS[op](value, operand)
        lines.append(f"{value}{op}{operand}={new}")
        expr, value = f"{expr} {op} {operand}", new
    question = f"What is {expr}?"
    solution = "\n".join(lines) + f"\n#### {value}"
    return {"question": question, "solution": solution, "answer": str(value)}


def generate(cfg: ArithmeticConfig) -> list[dict]:
    """`cfg.num_examples` problems from `cfg.split` (duplicates allowed when the space is small)."""
    rng = random.Random(f"arithmetic-{cfg.seed}-{cfg.split}")
    want_test = cfg.split == "test"
    rows, tries = [], 0
    while len(rows) < cfg.num_examples:
        tries += 1
        if tries > 200 * cfg.num_examples:
            raise ValueError(f"arithmetic task: could not draw {cfg.num_examples} {cfg.split} problems "
                             f"(digits={cfg.digits}, num_ops={cfg.num_ops}); the problem space is too small")
        row = make_problem(rng, cfg)
        if _in_test(row["question"], cfg.test_fraction) == want_test:
            rows.append(row)
    return rows


def corpus(cfg: ArithmeticConfig, n: int = 2000) -> list[str]:
    """Text to train a tokenizer on: questions and demonstrations of both splits."""
    texts = []
    for split in ("train", "test"):
        for row in generate(ArithmeticConfig(cfg.digits, cfg.num_ops, cfg.ops, n, cfg.seed, cfg.test_fraction, split)):
            texts += [row["question"], row["solution"]]
    return texts
