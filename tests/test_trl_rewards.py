"""TRL's own reward functions, named in a recipe and run unchanged through posttrain's executor (score_batch).

TRL 1.x ships `trl.rewards`: accuracy_reward, think_format_reward, reasoning_accuracy_reward (math-verify) and three
factories that return the reward function: get_cosine_scaled_reward, get_repetition_penalty_reward,
get_soft_overlong_punishment. A recipe names a factory with its arguments under `factory:`. The expected values
below are computed by hand from TRL's documented formulas.
"""
from __future__ import annotations

import math

import pytest
import yaml

from posttrain.configlib import ConfigError
from posttrain.rewarding import RewardError, build_reward_specs, load_rewards, score_batch

pytest.importorskip("trl.rewards")
pytest.importorskip("math_verify")

RECIPE = """
rewards:
  - {name: trl.rewards:accuracy_reward}
  - {name: trl.rewards:think_format_reward}
  - {name: trl.rewards:reasoning_accuracy_reward}
  - {name: trl.rewards:get_cosine_scaled_reward, factory: {max_len: 20}}
  - {name: trl.rewards:get_repetition_penalty_reward, factory: {ngram_size: 2, max_penalty: -1.0}}
  - {name: trl.rewards:get_soft_overlong_punishment, factory: {max_completion_len: 20, soft_punish_cache: 10},
     executor: process}
"""
TEXTS = ["<think>\n2 + 2 = 4\n</think>\nThe answer is $\\boxed{4}$.",      # right, in the think format
         "<think>\nmaybe five\n</think>\nSo \\boxed{5}.",                    # wrong, in the format
         "It is \\boxed{4}.",                                                # right, no reasoning block
         "<think>\nhm\n</think>\n\\boxed{7}"]                               # the gold does not parse: abstains
SOLUTION = ["4", "4", "4", "no answer here"]
IDS = [list(range(10)), [7] * 20, list(range(15)), list(range(25))]       # 10, 20 (one repeated token), 15, 25
PROMPTS = ["What is 2 + 2?"] * 4


def _rewards():
    return load_rewards(build_reward_specs(yaml.safe_load(RECIPE)["rewards"]))


def _cosine(correct: bool, length: int, max_len: int = 20) -> float:
    """TRL's cosine-scaled reward by hand: v_min + (v_max - v_min)(1 + cos(pi min(|y|/L, 1))) / 2, bounds swapped
    for a wrong answer."""
    lo, hi = (0.5, 1.0) if correct else (-0.5, -1.0)
    return lo + 0.5 * (hi - lo) * (1 + math.cos(math.pi * min(length / max_len, 1.0)))


def test_trl_rewards_on_conversational_completions():
    rewards = _rewards()
    try:
        assert [r.label for r in rewards] == ["accuracy_reward", "think_format_reward", "reasoning_accuracy_reward",
                                              "cosine_scaled_reward", "repetition_penalty_reward",
                                              "soft_overlong_punishment_reward"]
        assert rewards[-1].executor == "process"           # the worker re-creates the function from its factory
        prompts = [[{"role": "user", "content": p}] for p in PROMPTS]
        completions = [[{"role": "assistant", "content": t}] for t in TEXTS]
        batch = score_batch(rewards, prompts, completions, {"solution": SOLUTION}, completion_ids=IDS)
    finally:
        for r in rewards:
            r.close()
    v = batch.values
    assert v["accuracy_reward"] == [1.0, 0.0, 1.0, None]
    assert v["think_format_reward"] == [1.0, 1.0, 0.0, 1.0]
    assert v["reasoning_accuracy_reward"] == [1.0, 0.0, 0.0, None]      # no </think>: 0 for incomplete reasoning
    assert v["cosine_scaled_reward"] == pytest.approx([_cosine(True, 10), _cosine(False, 20), _cosine(True, 15)]
                                                      + [None])
    assert v["cosine_scaled_reward"][:2] == pytest.approx([0.75, -0.5])
    assert v["repetition_penalty_reward"] == pytest.approx([0.0, -18 / 19, 0.0, 0.0])   # 1 distinct of 19 bigrams
    assert v["soft_overlong_punishment_reward"] == [0.0, -1.0, -0.5, -1.0]             # (10 - 15) / 10 = -0.5
    assert batch.total[3] == pytest.approx(1.0 + 0.0 - 1.0)                              # abstentions leave the sum
    assert not batch.errors


def test_trl_rewards_on_plain_completions():
    """Plain text (TRL's standard format): the token-id rewards give the same values; TRL's math and format rewards
    read `completion[0]["content"]`, i.e. they require conversational data, and posttrain says which one failed."""
    by_label = {r.label: r for r in _rewards()}
    try:
        ids_only = [by_label["repetition_penalty_reward"], by_label["soft_overlong_punishment_reward"]]
        batch = score_batch(ids_only, PROMPTS, TEXTS, {"solution": SOLUTION}, completion_ids=IDS)
        assert batch.values["repetition_penalty_reward"] == pytest.approx([0.0, -18 / 19, 0.0, 0.0])
        assert batch.values["soft_overlong_punishment_reward"] == [0.0, -1.0, -0.5, -1.0]
        for label in ("accuracy_reward", "think_format_reward", "reasoning_accuracy_reward", "cosine_scaled_reward"):
            with pytest.raises(RewardError, match=rf"reward '{label}': raised TypeError: string indices must be "
                                                  r"integers.*\(at .*trl/rewards/"):
                score_batch([by_label[label]], PROMPTS, TEXTS, {"solution": SOLUTION}, completion_ids=IDS)
    finally:
        by_label["soft_overlong_punishment_reward"].close()


@pytest.mark.parametrize("entry,message", [
    ({"name": "trl.rewards:get_soft_overlong_punishment", "factory": {"max_completion_len": 20, "cache": 4}},
     r"rewards.0.factory.cache: not an argument of factory 'trl.rewards:get_soft_overlong_punishment'; its "
     r"arguments: max_completion_len, soft_punish_cache"),
    ({"name": "trl.rewards:get_cosine_scaled_reward", "factory": {}},
     r"rewards.0.factory: factory 'trl.rewards:get_cosine_scaled_reward' needs max_len \(no default\)"),
    ({"name": "trl.rewards:get_repetition_penalty_reward", "factory": {"max_penalty": 1.0}},
     r"rewards.0.factory: trl.rewards:get_repetition_penalty_reward\(\*\*\{'max_penalty': 1.0\}\) raised ValueError: "
     r"max_penalty 1.0 should not be positive"),
    ({"name": "trl.rewards:get_cosine_scaled_reward"},
     r"rewards.0.name: reward 'trl.rewards:get_cosine_scaled_reward' must accept `completions` by keyword.*give its "
     r"arguments under `factory:`"),
    ({"name": "trl.rewards:think_format_reward", "factory": {}},
     r"rewards.0.factory: factory 'trl.rewards:think_format_reward' needs completions \(no default\)"),
])
def test_factory_errors_name_the_key(entry, message):
    with pytest.raises(ConfigError, match=message):
        load_rewards(build_reward_specs([entry]))
