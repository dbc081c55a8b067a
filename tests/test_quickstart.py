"""The README's quickstart recipe as written: SFT on three-step arithmetic chains, then GRPO with the `steps` verifier
raises both the sampled reward and the held-out greedy accuracy by a clear margin (the learning test of issue 5 on
the task's own reward, from the partly trained SFT model of the first stage)."""
from __future__ import annotations

import statistics

import pytest

from posttrain.config import load_recipe
from posttrain.trainer import train

from conftest import REPO, read_metrics


@pytest.mark.slow
def test_quickstart_sft_then_grpo_raises_reward_and_accuracy(tmp_path, capsys, one_thread):
    out = tmp_path / "quickstart"
    recipe = load_recipe(REPO / "recipes/quickstart.yaml",
                         [f"output_dir={out}", "train.log_every=1", "logging.progress_bar=false",
                          "logging.report_to=[]"])
    assert [(s.name, list(s.objectives)) for s in recipe.stages] == [("sft", ["sft"]), ("grpo", ["grpo"])]
    result = train(recipe)
    rows = read_metrics(out)
    sft_accuracy = [r["eval/accuracy"] for r in rows if r.get("stage") == 0 and "eval/accuracy" in r][-1]
    rewards = [r["reward/mean"] for r in rows if r.get("stage") == 1 and "reward/mean" in r]
    assert len(rewards) == recipe.stages[1].train.steps == 150
    first, last = statistics.mean(rewards[:15]), statistics.mean(rewards[-15:])
    # `posttrain train` (2 threads), seeds 0, 1, 2: first 0.16-0.35, last 0.47-0.62; accuracy 0.21-0.34 -> 0.55-0.76
    assert last > first + 0.1, (first, last, rewards)
    assert 0.05 < sft_accuracy < 0.5, sft_accuracy          # partly trained: room for RL to improve it
    assert result["eval/accuracy"] > sft_accuracy + 0.1, (sft_accuracy, result)
    printed = capsys.readouterr().out
    assert (f"stage grpo: reward/mean {first:.3f} (first 15 steps) -> {last:.3f} (last 15 steps) over 150 steps"
            in printed)
    assert (out / "final/model.safetensors").is_file()
