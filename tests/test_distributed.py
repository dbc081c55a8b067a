"""1 process vs 2 real CPU processes over gloo: the same global batch gives the same loss curve."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, read_metrics

STEPS = 4


def _recipe(model_dir: Path, out: Path, micro: int) -> dict:
    return {
        "output_dir": str(out), "seed": 0, "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48, "task": {"digits": 1, "num_ops": 1, "ops": "+", "num_examples": 256}},
        "objectives": {"sft": {}},
        "train": {"batch_size": 8, "micro_batch_size": micro, "log_every": 1},
        "optim": {"lr": 1e-3, "weight_decay": 0.0}, "schedule": {"name": "constant", "warmup_steps": 0},
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [{"name": "sft", "objectives": {"sft": 1.0}, "train": {"steps": STEPS}}],
    }


def _launch(tmp_path: Path, name: str, recipe: dict, processes: int) -> list[dict]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    if processes == 1:
        cmd = [sys.executable, "-m", "posttrain", "train", str(path)]
    else:  # `--cpu --num_processes 2` silently starts ONE process; --multi_gpu with ACCELERATE_USE_CPU starts two
        cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
               "-m", "posttrain", "train", str(path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return read_metrics(recipe["output_dir"])


@pytest.mark.slow
def test_one_vs_two_processes_same_loss_curve(tiny_model_dir, tmp_path):
    single = _launch(tmp_path, "single", _recipe(tiny_model_dir, tmp_path / "single", micro=4), 1)
    double = _launch(tmp_path, "double", _recipe(tiny_model_dir, tmp_path / "double", micro=4), 2)
    assert single[0]["world_size"] == 1 and double[0]["world_size"] == 2  # two real processes, not one
    a = [r for r in single if "loss" in r]
    b = [r for r in double if "loss" in r]
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1))
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)
    assert a[-1]["loss"] < a[0]["loss"]
