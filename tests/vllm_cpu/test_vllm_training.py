"""The trainer with the colocated `vllm` engine, end to end: LoRA GRPO with a KL to the adapter-disabled base, then a
Prefix-RFT stage whose rollouts vLLM continues from demonstration prefixes, as `posttrain train` in a fresh process
(vLLM starts once per process and keeps its settings)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml
from helpers import ENGINE

pytest.importorskip("vllm")
pytestmark = pytest.mark.slow    # a fresh interpreter, a vLLM start and two stages: about a minute on 2 cores


LENGTH_REWARD = '''
def length(prompts, completions, **kwargs):
    """Characters / 50: varies within every group of a barely trained model, so every step moves the adapters."""
    return [len(c) / 50 for c in completions]
'''


def _recipe(model_dir, out, reward: str) -> dict:
    rl = {"micro_batch_size": 8}
    return {
        "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_dir), "lora": {"r": 4, "alpha": 8, "dropout": 0.0,
                                                   "target_modules": ["q_proj", "v_proj"]}},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+", "num_examples": 64}},
        "objectives": {"grpo": {"beta": 0.04}, "prefix_rft": {"prefixed": 2, "low": 0.3, "high": 0.6}},
        "train": {"batch_size": 8, "micro_batch_size": 8, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "rollout": {"engine": "vllm", "engine_args": dict(ENGINE),
                    "sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 16}, "prompts_per_step": 2},
        "rewards": [{"name": reward}],
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": "grpo", "objectives": {"grpo": 1.0}, "train": {"steps": 2, **rl}},
                   {"name": "prefix", "objectives": {"prefix_rft": 1.0}, "train": {"steps": 2, **rl}}],
    }


def test_lora_grpo_then_prefix_rft_on_the_vllm_engine(model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    (tmp_path / "toy_reward.py").write_text(LENGTH_REWARD)
    recipe.write_text(yaml.safe_dump(_recipe(model_dir, tmp_path / "run", f"{tmp_path / 'toy_reward.py'}:length")))
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [(r["stage"], r["step"]) for r in steps] == [(0, 1), (0, 2), (1, 3), (1, 4)]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6) and steps[1]["kl"] > 0    # the base is the reference
    assert steps[1]["time/sync"] > 0 and steps[3]["time/sync"] > 0     # the updated adapters were pushed to vLLM
    assert all(0 < r["tokens/prefix_frac"] < 1 for r in steps[2:])    # vLLM continued demonstration prefixes
    assert (tmp_path / "run/final/adapter_config.json").is_file()
