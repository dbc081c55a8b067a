"""RL in the training loop: rollout stages end to end, exact resume, every tiny RL recipe, dynamic sampling through the
builder, the value head through checkpoints, and 1 vs 2 real processes."""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import load_recipe, parse_recipe
from posttrain.configlib import ConfigError
from posttrain.rl.value_head import ValueHeadModel
from posttrain.trainer import Trainer, train

from conftest import REPO, read_metrics, tiny_recipe_overrides

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def toy(toy_reward):
    return toy_reward


def rl_raw(model_dir, out, reward: str, objective: dict, steps: int = 2, warmup: int = 0, rollout: dict | None = None):
    """A small recipe on 1-digit arithmetic: optional SFT warm-up stage, then one RL stage."""
    name = objective.get("type", "grpo")
    stages = [{"name": "warmup", "objectives": {"sft": 1.0}, "train": {"steps": warmup}}] if warmup else []
    stages.append({"name": "rl", "objectives": {name: 1.0}, "train": {"steps": steps, "micro_batch_size": 8}})
    return {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+-", "num_examples": 256}},
        "objectives": {"sft": {}, name: objective},
        "train": {"batch_size": 16, "micro_batch_size": 16, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
        "rollout": {"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 12}, "prompts_per_step": 4,
                    **(rollout or {})},
        "rewards": [{"name": reward}],
        "logging": {"report_to": [], "progress_bar": False},
        "stages": stages,
    }


def _rl_rows(run_dir, stage: int) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r.get("stage") == stage and "loss" in r]


def _weights(path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


USER_METRICS = ["reward/mean", "reward/std", "frac_reward_zero_std", "completion/mean_length",
                "completion/clipped_ratio", "kl", "entropy", "clip_ratio/low", "clip_ratio/high", "loss/policy",
                "grad_norm", "lr", "time/generate", "time/reward", "time/train", "time/sync"]


# ------------------------------------------------------------------------------------------------ end to end
def test_grpo_stage_runs_and_resumes_exactly(tiny_model_dir, tmp_path, toy):
    """SFT warm-up then GRPO (KL to the warm-up model, 2 optimizer steps per rollout batch): the metrics users look for
    are logged and finite, and resuming from a mid-stage checkpoint reproduces the uninterrupted run exactly."""
    raw = rl_raw(tiny_model_dir, tmp_path / "full", toy("digits"), {"type": "grpo", "beta": 0.04}, steps=4, warmup=2,
                 rollout={"mini_batch_size": 8})
    raw["stages"][1]["train"] |= {"save_every": 2, "keep_checkpoints": 5}
    train(parse_recipe(raw, "test"))
    rows = _rl_rows(tmp_path / "full", stage=1)
    assert [r["step"] for r in rows] == [3, 4, 5, 6]
    for name in USER_METRICS + ["reward/" + toy("digits").split(":")[1] + "/mean"]:
        assert name in rows[0], name
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 and r["optimizer_steps"] == 2 for r in rows)
    assert 0 < rows[0]["reward/std"] and rows[0]["frac_reward_zero_std"] < 1
    assert rows[-1]["kl"] != 0                           # the policy has moved away from the reference
    assert (tmp_path / "full/references/stage1/model.safetensors").is_file()

    raw["output_dir"] = str(tmp_path / "resumed")
    train(parse_recipe(raw, "test"), resume=str(tmp_path / "full/checkpoints/step-000004"))
    resumed = _rl_rows(tmp_path / "resumed", stage=1)
    assert [r["step"] for r in resumed] == [5, 6]
    for a, b in zip(rows[2:], resumed):
        for key in ("loss", "reward/mean", "grad_norm", "kl", "completion/mean_length"):
            assert a[key] == pytest.approx(b[key], abs=1e-6), key
    wa, wb = _weights(tmp_path / "full/final/model.safetensors"), _weights(tmp_path / "resumed/final/model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("name", ["grpo", "dr_grpo", "dapo", "ppo_reft"])
def test_tiny_rl_recipe_runs(name, tiny_model_dir, tmp_path):
    """Each tiny RL recipe as written (warm-up stage, RL stage, its rewards), shortened to 2 + 2 steps."""
    overrides = tiny_recipe_overrides(tiny_model_dir, tmp_path / name) + [
        "data.task.num_examples=256", "eval.data=null", "train.log_every=1", "stages.0.train.steps=2",
        "stages.1.train.steps=2",
        "rollout.prompts_per_step=4", "rollout.sampling.max_new_tokens=12", "stages.1.train.micro_batch_size=8"]
    if name == "ppo_reft":
        overrides.append("rollout.mini_batch_size=2")
    if name == "dapo":
        overrides += ["rollout.mini_batch_size=16", "objectives.dapo.max_sampling_rounds=2"]
    result = train(load_recipe(REPO / "recipes/tiny" / f"{name}.yaml", overrides))
    rows = _rl_rows(tmp_path / name, stage=1)
    assert [r["step"] for r in rows] == [3, 4] and all(math.isfinite(r["loss"]) for r in rows), result
    assert "reward/mean" in rows[-1] and "completion/mean_length" in rows[-1]
    if name == "ppo_reft":
        assert rows[-1]["optimizer_steps"] == 4 and "loss/value" in rows[-1]
        assert (tmp_path / name / "final/value_head.safetensors").is_file()
    if name == "dapo":
        assert 1 <= rows[-1]["sampling/rounds"] <= 2


@pytest.mark.slow
def test_grpo_raises_the_reward(tiny_model_dir, tmp_path, toy):
    """From a briefly SFT-trained tiny model, 20 GRPO steps raise a dense reward (the fraction of digits in the
    completion) by a clear margin: the loop learns in the direction of the advantages, at a useful rate, in seconds.
    Learning on the task's own verifier reward is tested on the quickstart recipe (tests/test_quickstart.py)."""
    raw = rl_raw(tiny_model_dir, tmp_path, toy("digits"), {"type": "grpo", "beta": 0.0}, steps=20, warmup=20,
                 rollout={"sampling": {"n": 8, "temperature": 1.0, "max_new_tokens": 20}, "prompts_per_step": 16})
    raw["train"] = {"batch_size": 32, "micro_batch_size": 32, "log_every": 1}
    raw["optim"]["lr"] = 3e-3
    raw["stages"][1] |= {"optim": {"lr": 1e-3}, "train": {"steps": 20, "micro_batch_size": 64}}
    train(parse_recipe(raw, "test"))
    rewards = [r["reward/mean"] for r in _rl_rows(tmp_path, stage=1)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.15, rewards


def test_rl_stage_without_rewards_is_a_config_error(tiny_model_dir, tmp_path):
    raw = rl_raw(tiny_model_dir, tmp_path, "exact", {"type": "grpo"})
    del raw["rewards"]
    with pytest.raises(ConfigError, match=r"stages\.0\.rewards: objective 'grpo' learns from rollouts"):
        parse_recipe(raw, "test")


def test_prompts_per_step_must_split_over_processes(tiny_model_dir, tmp_path):
    from posttrain.rl.config import RolloutConfig
    from posttrain.sources import check_world

    with pytest.raises(ConfigError, match=r"stages\.1\.rollout\.prompts_per_step \(6\) must be a multiple"):
        check_world(RolloutConfig(prompts_per_step=6), 4, "stages.1.rollout", "r.yaml")


# ------------------------------------------------------------------------------------------- the builder
def _builder(tiny_model_dir, reward: str, objective: dict, rollout: dict):
    """A RolloutBuilder on the tiny model with the real hf engine, as the trainer builds it."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from posttrain.config import _build_objective
    from posttrain.configlib import build
    from posttrain.data import DataConfig, load_rows, to_examples
    from posttrain.objectives import build_objective
    from posttrain.rewarding import RewardSpec, load_rewards
    from posttrain.rl.config import RolloutConfig
    from posttrain.rollout import ENGINES
    from posttrain.sources import RolloutBuilder, rollout_prompts

    acc = Accelerator(cpu=True)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    data = DataConfig(source="task:arithmetic", task={"digits": 1, "num_ops": 1, "ops": "+-", "num_examples": 64},
                      max_length=48)
    rows, columns = load_rows(data)
    prompts, dropped = rollout_prompts(to_examples(rows, columns, data), tok, data)
    cfg = build(RolloutConfig, rollout)
    obj = build_objective(_build_objective(objective["type"], objective, "test"))
    rewards = load_rewards([RewardSpec(reward)])
    engine = ENGINES.get("hf")(model, tok, {}, acc)
    return RolloutBuilder(prompts, cfg, obj.rollout_plan(), rewards, engine, tok, acc, 0, 8, "padded"), model


def test_dynamic_sampling_keeps_only_informative_groups(tiny_model_dir, toy):
    builder, model = _builder(tiny_model_dir, toy("plus_constant"), {"type": "dapo", "max_sampling_rounds": 6},
                              {"sampling": {"n": 4, "temperature": 0.7, "max_new_tokens": 10}, "prompts_per_step": 6})
    exp, metrics = builder.collect(model, None)
    live = exp.loss_mask.sum(-1) > 0                                                   # [B] rows that carry loss
    assert len(torch.unique(exp.group)) == 6 and len(exp) == 24
    for g in torch.unique(exp.group[live]):
        r = exp.rewards[exp.group == g]
        assert r.max() > r.min()                                                       # never a zero-variance group
        assert "+" not in exp.columns[int((exp.group == g).nonzero()[0])]["question"]
    assert metrics["sampling/dropped_groups"] >= 1 and metrics["sampling/rounds"] <= 6
    assert builder.cursor == 6 * metrics["sampling/rounds"]
    if metrics["sampling/padded_groups"] == 0:
        assert bool(live.all())
    # the experience: the loss covers exactly the completion, and the engine's log-probs are the policy's at T
    assert bool(((exp.source == 3) == exp.loss_mask.bool())[live].all())
    teacher, _, _ = builder.scored(model, exp)                                           # [B, L] at T = 0.7
    mask = exp.target_mask.bool()
    assert torch.allclose(teacher[mask], exp.sampler_logprobs[mask], atol=1e-4)
    assert exp.old_logprobs is None and exp.ref_logprobs is None                      # one update, no KL: not needed
    assert exp.advantages.shape == exp.target_mask.shape


def test_dynamic_sampling_stops_at_its_cap(tiny_model_dir, toy):
    builder, model = _builder(tiny_model_dir, toy("constant"), {"type": "dapo", "max_sampling_rounds": 3},
                              {"sampling": {"n": 2, "temperature": 1.0, "max_new_tokens": 4}, "prompts_per_step": 4})
    exp, metrics = builder.collect(model, None)
    assert metrics["sampling/rounds"] == 3 and builder.cursor == 12
    assert metrics["sampling/dropped_groups"] == 12 and metrics["sampling/padded_groups"] == 4
    assert len(exp) == 8 and int(exp.loss_mask.sum()) == 0                            # padding only: nothing trains
    assert float(exp.advantages.abs().sum()) == 0.0


# ------------------------------------------------------------------------------------------- value head
def test_value_head_survives_checkpoint_and_export(tiny_model_dir, tmp_path, toy):
    """PPO with a value head: the head is in the checkpoint, resuming from it continues exactly (policy and head), and
    the exported value_head.safetensors is the trained head."""
    raw = rl_raw(tiny_model_dir, tmp_path / "full", toy("digits"), {"type": "ppo", "beta": 0.05}, steps=2,
                 rollout={"sampling": {"n": 1, "temperature": 1.0, "max_new_tokens": 8}, "prompts_per_step": 8,
                          "num_iterations": 2, "mini_batch_size": 4})
    raw["stages"][0]["train"] |= {"save_every": 1, "keep_checkpoints": 5}
    trainer = Trainer(parse_recipe(raw, "test"))
    trainer.run()
    live = trainer.accelerator.unwrap_model(trainer.model)
    exported = _weights(tmp_path / "full/final/value_head.safetensors")
    assert torch.equal(exported["weight"], live.value_head.weight)
    assert torch.equal(exported["bias"], live.value_head.bias)
    reloaded = ValueHeadModel.from_pretrained(tmp_path / "full/final").eval()      # backbone + head, as exported
    ids = torch.tensor([[1, 20, 21, 22, 13, 30, 2]])
    with torch.no_grad():
        a, b = live.eval()(ids), reloaded(ids)
    assert torch.equal(a.logits, b.logits) and torch.equal(a.values, b.values)
    assert "value_head.weight" in _weights(tmp_path / "full/checkpoints/step-000001/model.safetensors")
    assert _rl_rows(tmp_path / "full", 0)[0]["optimizer_steps"] == 4

    raw["output_dir"] = str(tmp_path / "resumed")
    train(parse_recipe(raw, "test"), resume=str(tmp_path / "full/checkpoints/step-000001"))
    a, b = _rl_rows(tmp_path / "full", 0)[1], _rl_rows(tmp_path / "resumed", 0)[0]
    assert a["loss/value"] == pytest.approx(b["loss/value"], abs=1e-7)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-7)
    for name in ("value_head.safetensors", "model.safetensors"):
        wa, wb = _weights(tmp_path / "full/final" / name), _weights(tmp_path / "resumed/final" / name)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name


# ------------------------------------------------------------------------------------------ 1 vs 2 processes
def _distributed_recipe(model_dir, out, reward: str) -> dict:
    """GRPO with a KL term; a sampling seed gives every prompt its own random stream, so any number of processes
    samples the same completions. 8 completions per process in 2 micro-batches: gradient accumulation is exercised."""
    raw = rl_raw(model_dir, out, reward, {"type": "grpo", "beta": 0.04}, steps=2,
                 rollout={"sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 10, "seed": 7}})
    raw["stages"][0]["train"]["micro_batch_size"] = 4
    raw["eval"] = {"data": {"source": "task:arithmetic", "split": "test", "task": {"digits": 1, "num_ops": 1,
                                                                                  "num_examples": 7}},
                   "reward": "exact", "num_samples": 7, "max_new_tokens": 10}   # 4 + 3 prompts on 2 processes
    return raw


@pytest.fixture(scope="module")
def single_process_run(tiny_model_dir, tmp_path_factory, toy):
    out = tmp_path_factory.mktemp("single")
    rows = launch(out, "single", _distributed_recipe(tiny_model_dir, out / "run", toy("digits")))
    return [r for r in rows if "loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "zero2", "zero3"])
def test_grpo_two_processes_match_one(mode, single_process_run, tiny_model_dir, tmp_path, toy):
    """2 real CPU processes over gloo (DDP, DeepSpeed ZeRO-2, ZeRO-3: generation gathers the shards, the reference is
    gathered once) give the same two steps and the same final evaluation as 1 process with the same global batch."""
    if mode != "ddp":
        pytest.importorskip("deepspeed")
    rows = launch(tmp_path, mode, _distributed_recipe(tiny_model_dir, tmp_path / "run", toy("digits")), mode)
    assert rows[0]["world_size"] == 2
    if mode != "ddp":                                    # really DeepSpeed: its own checkpoint layout
        assert (tmp_path / "run/checkpoints/step-000002/pytorch_model").is_dir()
    double = [r for r in rows if "loss" in r]
    assert [r["step"] for r in single_process_run] == [r["step"] for r in double] == [1, 2]
    for a, b in zip(single_process_run, double):   # step 2 samples from the weights both runs updated identically
        assert a["reward/mean"] == b["reward/mean"] and a["completion/mean_length"] == b["completion/mean_length"]
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)
        assert a["entropy"] == pytest.approx(b["entropy"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5) and a["grad_norm"] > 0
    # the final greedy evaluation (under ZeRO-3 the engine gathers the shards on both processes) scores all 7 prompts
    assert single_process_run[-1]["eval/num_samples"] == double[-1]["eval/num_samples"] == 7
    assert single_process_run[-1]["eval/accuracy"] == double[-1]["eval/accuracy"]


DEEPSPEED_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config: {{zero_stage: {stage}, zero3_init_flag: {zero3}, zero3_save_16bit_model: {zero3},
                   offload_optimizer_device: none, offload_param_device: none}}
num_machines: 1
num_processes: 2
machine_rank: 0
mixed_precision: "no"
use_cpu: false
"""


def launch(tmp_path: Path, name: str, recipe: dict, mode: str = "single") -> list[dict]:
    """`posttrain train` in 1 process, or 2 real CPU processes over gloo: DDP as tests/test_distributed.py, or
    DeepSpeed (use_cpu must be false: with it accelerate silently skips DeepSpeed; DS_ACCELERATOR=cpu instead)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    cmd = [sys.executable, "-m", "posttrain", "train", str(path)]
    if mode != "single":
        with socket.socket() as s:       # a free port: other test runs on this machine may hold the default one
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
        launcher = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
        if mode.startswith("zero"):
            config = tmp_path / f"accelerate-{mode}.yaml"
            stage = int(mode[-1])
            config.write_text(DEEPSPEED_CONFIG.format(stage=stage, zero3=str(stage == 3).lower()))
            launcher = ["--config_file", str(config)]
            env = {**env, "DS_ACCELERATOR": "cpu"}
            env.pop("ACCELERATE_USE_CPU")
        cmd = [accelerate, "launch", *launcher, "--dynamo_backend", "no", "--main_process_port", str(port)] + cmd[1:]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(recipe["output_dir"])
