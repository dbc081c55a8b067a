"""A NaN or inf never reaches the weights: in a loss, a gradient, a reward or the advantages, the step is skipped and
counted (train.nonfinite: skip) or the run stops with an error naming the step, the objective and the micro-batch;
too many consecutive skips stop it too."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from test_hybrids import raw_recipe

from posttrain.config import parse_recipe
from posttrain.objectives.sft import SFT
from posttrain.trainer import NonFiniteError, Trainer, train

from conftest import read_metrics, sft_recipe


@pytest.fixture
def nan_at(monkeypatch):
    """SFT's loss becomes NaN on the given global steps (1-based) of the run."""
    def arm(steps: set[int], trainer_ref: list):
        call = SFT.__call__

        def poisoned(self, out, exp):
            loss, metrics = call(self, out, exp)
            if trainer_ref[0].state.global_step + 1 in steps:
                loss = loss * float("nan")
            return loss, metrics
        monkeypatch.setattr(SFT, "__call__", poisoned)
    return arm


def _trainer(recipe) -> tuple[Trainer, list]:
    trainer = Trainer(recipe)
    return trainer, [trainer]


def _weights(run_dir, step: int) -> dict:
    return load_file(str(run_dir / f"checkpoints/step-{step:06d}/model.safetensors"))


def test_nan_loss_stops_naming_step_objective_and_micro_batch(tiny_model_dir, tmp_path, nan_at):
    recipe = sft_recipe(tiny_model_dir, tmp_path, steps=5, overrides=["train.micro_batch_size=4"])
    trainer, ref = _trainer(recipe)
    nan_at({3}, ref)
    with pytest.raises(NonFiniteError, match=r"stage 'sft' step 3: a non-finite loss \(nan\) in objective 'sft' on "
                                             r"demos micro-batch 0 \(process 0\); the update was not applied"):
        trainer.run()
    assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2]


def test_nan_loss_skipped_leaves_the_weights_and_counts(tiny_model_dir, tmp_path, nan_at):
    recipe = sft_recipe(tiny_model_dir, tmp_path, steps=4, overrides=["train.nonfinite=skip", "train.save_every=1",
                                                                      "train.keep_checkpoints=10"])
    trainer, ref = _trainer(recipe)
    nan_at({3}, ref)
    trainer.run()
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert rows[3]["train/skipped_nonfinite"] == 1.0 and rows[4]["train/skipped_nonfinite"] == 0.0
    assert rows[3]["train/skipped_nonfinite_total"] == 1.0
    before, skipped, after = _weights(tmp_path, 2), _weights(tmp_path, 3), _weights(tmp_path, 4)
    assert all(torch.equal(before[k], skipped[k]) for k in before)          # the NaN step changed nothing
    assert any(not torch.equal(skipped[k], after[k]) for k in before)       # training went on
    assert all(torch.isfinite(v).all() for v in after.values())


def test_consecutive_skips_stop(tiny_model_dir, tmp_path, nan_at):
    recipe = sft_recipe(tiny_model_dir, tmp_path, steps=6, overrides=["train.nonfinite=skip",
                                                                      "train.max_nonfinite_skips=2"])
    trainer, ref = _trainer(recipe)
    nan_at({2, 3, 4, 5}, ref)
    with pytest.raises(NonFiniteError, match=r"step 4: .*\(3 consecutive steps skipped; max_nonfinite_skips is 2\)"):
        trainer.run()


def test_nan_gradient_is_skipped(tiny_model_dir, tmp_path):
    recipe = sft_recipe(tiny_model_dir, tmp_path, steps=3, overrides=["train.nonfinite=skip", "train.save_every=1",
                                                                      "train.keep_checkpoints=10"])
    trainer = Trainer(recipe)
    weight = trainer.model.model.layers[0].mlp.up_proj.weight
    weight.register_hook(lambda g: g * float("inf") if trainer.state.global_step + 1 == 2 else g)
    trainer.run()
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "loss" in r}
    assert rows[2]["train/skipped_nonfinite"] == 1.0 and not math.isfinite(float(rows[2]["grad_norm"]))
    assert math.isfinite(rows[2]["loss"])                                   # the loss was fine: the gradient was not
    a, b = _weights(tmp_path, 1), _weights(tmp_path, 2)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def nan_reward(tmp_path_factory):
    path = tmp_path_factory.mktemp("rewards") / "nan_reward.py"
    path.write_text("def nan_once(prompts, completions, **kwargs):\n"
                    "    return [float('nan')] + [0.5] * (len(completions) - 1)\n")
    return f"{path}:nan_once"


def test_nan_reward_stops_or_is_zeroed_by_on_error(tiny_model_dir, tmp_path, nan_reward):
    from posttrain.rewarding import RewardError

    grpo, stage = {"grpo": {"beta": 0.0}}, {"objectives": {"grpo": 1.0}}
    raw = raw_recipe(tiny_model_dir, tmp_path / "raise", nan_reward, grpo, stage)
    with pytest.raises(RewardError, match=r"reward 'nan_once' at sample 0: .*(nan|NaN)"):
        train(parse_recipe(raw, "test"))
    raw = raw_recipe(tiny_model_dir, tmp_path / "zero", nan_reward, grpo, stage)
    raw["rewards"] = [{"name": nan_reward, "on_error": "zero"}]
    raw["stages"][0]["train"] = {"steps": 2, "save_every": 1}
    train(parse_recipe(raw, "test"))
    rows = [r for r in read_metrics(tmp_path / "zero") if "loss" in r]
    assert all(r["reward/nan_once/errors"] > 0 and math.isfinite(r["loss"]) for r in rows)
    assert all(torch.isfinite(v).all() for v in _weights(tmp_path / "zero", 2).values())


def test_nan_advantages_stop_before_training(tiny_model_dir, tmp_path, monkeypatch):
    import posttrain.sources.rollouts as rollouts

    real = rollouts.compute_advantages

    def broken(*a, **k):
        adv, ret = real(*a, **k)
        return adv * float("nan"), ret
    monkeypatch.setattr(rollouts, "compute_advantages", broken)
    raw = raw_recipe(tiny_model_dir, tmp_path, "exact", {"grpo": {"beta": 0.0}}, {"objectives": {"grpo": 1.0}})
    with pytest.raises(NonFiniteError, match=r"stage 'hybrid' step 1: the rollout batch has non-finite advantages"):
        train(parse_recipe(raw, "test"))
    assert not [r for r in read_metrics(tmp_path) if "loss" in r]
