"""Rewards in a recipe, and running them on a batch: concurrently, each call bounded, every failure reported.

One module per concern:
    spec.py        RewardSpec (one `rewards:` entry of a recipe) and build_reward_specs
    loading.py     load_rewards: resolve each name (posttrain.rewards registry, module:function, file.py:function, or
                   a factory and its arguments), check its settings against its signature -> Reward
    executors.py   score_batch: every reward on a batch at once, as TRL calls them; thread / process / async
                   executors, timeouts, validation of the values, on_error -> RewardBatch
    worker.py      the worker process of the process executor (`python -m posttrain.rewarding.worker`)
    combining.py   RewardBatch, the weighted total (combine) and the metrics (reward_metrics)
    check.py       `posttrain rewards check`: a whole data set through one reward, summarised

A recipe lists its rewards (each entry a `RewardSpec`):

    rewards:
      - {name: gsm8k, weight: 1.0}
      - {name: format, weight: 0.1, kwargs: {tags: [think, answer]}, on_error: zero}
      - {name: my_rewards.py:brevity, weight: 0.05, alias: brevity, timeout: 30}
      - {name: trl.rewards:get_soft_overlong_punishment, factory: {max_completion_len: 256, soft_punish_cache: 64}}

Training (the rollout builder), the in-training evaluation and `posttrain eval` all score through `score_batch`.
"""
from posttrain.rewarding.check import check_reward, format_summary
from posttrain.rewarding.combining import RewardBatch, combine, reward_metrics
from posttrain.rewarding.executors import RewardError, score_batch
from posttrain.rewarding.loading import Reward, check_reward_inputs, load_rewards
from posttrain.rewarding.spec import RewardSpec, build_reward_specs

__all__ = ["RewardSpec", "build_reward_specs", "Reward", "check_reward_inputs", "load_rewards", "RewardError",
           "score_batch", "RewardBatch",
           "combine", "reward_metrics", "check_reward", "format_summary"]
