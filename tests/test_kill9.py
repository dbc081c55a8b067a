"""kill -9 anywhere: a three-stage run (SFT, then GRPO, then the LUFFY hybrid under SASR's stochastic mixer) is sent
SIGKILL at 20 seeded random moments, a quarter of them aimed inside checkpoint writes, and resumed with
`--resume auto` after each. It must end exactly where the uninterrupted run ends: the same weights bit for bit, the
same metrics rows (each step once, no gaps, the same losses), no partial checkpoint ever visible as `step-*`, no
temporary directory left behind."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain import checkpoint as ckpt

from conftest import read_metrics, train_on_two_processes

KILLS = 20
STEPS = 9                      # 3 stages x 3 steps
IN_WRITES = 5                  # of the KILLS, aimed at a moment inside a checkpoint write
WRITE_DELAY = "0.15"           # seconds held after each phase of a checkpoint write (widens the window)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", ckpt.WRITE_DELAY_ENV: WRITE_DELAY}


def recipe_raw(model_dir: Path, out: Path) -> dict:
    """SFT (3 steps) -> GRPO (3) -> LUFFY + SFT mixed by SASR (3): a checkpoint after every step, two kept."""
    rl = {"micro_batch_size": 16}
    return {
        "output_dir": str(out), "seed": 0,
        "model": {"path": str(model_dir)},
        "data": {"source": "task:arithmetic", "max_length": 48,
                 "task": {"digits": 1, "num_ops": 1, "ops": "+", "num_examples": 256}},
        "objectives": {"sft": {"aggregation": "token_mean"}, "grpo": {"beta": 0.0, "std_eps": 1e-4}, "luffy": {}},
        "train": {"batch_size": 8, "micro_batch_size": 8, "log_every": 1, "save_every": 1, "keep_checkpoints": 2},
        "optim": {"lr": 1e-3, "weight_decay": 0.0},
        "schedule": {"name": "constant", "warmup_steps": 0},
        "rollout": {"engine": "hf", "sampling": {"n": 4, "temperature": 1.0, "max_new_tokens": 12},
                    "prompts_per_step": 4},
        "rewards": [{"name": "exact"}],
        "logging": {"report_to": [], "progress_bar": False},
        "stages": [
            {"name": "sft", "objectives": {"sft": 1.0}, "train": {"steps": 3}},
            {"name": "grpo", "objectives": {"grpo": 1.0}, "train": {"steps": 3, **rl}},
            {"name": "hybrid", "objectives": {"sft": 1.0, "luffy": 1.0}, "train": {"steps": 3, "micro_batch_size": 20},
             "mixer": {"name": "sasr", "sft": "sft", "rl": "luffy", "warmup_steps": 1, "gamma": 2.0}},
        ],
    }


def _launch(recipe: Path, resume: bool, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "posttrain", "train", str(recipe)] + (["--resume", "auto"] if resume else [])
    with log.open("w") as f:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=f)


def _writing(run: Path) -> bool:
    """A checkpoint write is in progress (its temporary directory exists)."""
    root = run / "checkpoints"
    return root.is_dir() and any(p.name.startswith(ckpt.TMP_PREFIX + "step-") for p in root.iterdir())


def _training(run: Path, since: float) -> bool:
    """The process launched at `since` (time.time()) is past its set-up: it has written to metrics.jsonl."""
    metrics = run / "metrics.jsonl"
    return metrics.is_file() and metrics.stat().st_mtime > since


def _wait(proc: subprocess.Popen, until) -> None:
    while not until() and proc.poll() is None:
        time.sleep(0.005)


def _kill(proc: subprocess.Popen, launched: float, run: Path, moment: tuple, seconds: float) -> tuple[str, int]:
    """SIGKILL `proc` (launched at time.time() `launched`) `seconds` after a moment: ("startup",) its start,
    ("write",) the start of the first checkpoint write it makes, ("step", n) the moment it has logged step n - 1 (so
    it is in step n or in the checkpoint write after step n - 1). Returns where it was hit ("startup", "write" or
    "step"; "finished" if it ended first) and the last step logged."""
    if moment[0] == "write":
        _wait(proc, lambda: _writing(run))
    elif moment[0] == "step":
        _wait(proc, lambda: _training(run, launched) and _last_step(run) >= moment[1] - 1)
    start = time.monotonic()
    _wait(proc, lambda: time.monotonic() - start >= seconds)
    if proc.poll() is not None:
        return "finished", _last_step(run)
    where = "write" if _writing(run) else "step" if _training(run, launched) else "startup"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return where, _last_step(run)


def _last_step(run: Path) -> int:
    """The last step metrics.jsonl holds a row of (0 if none)."""
    metrics = run / "metrics.jsonl"
    return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0) if metrics.is_file() else 0


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "final/model.safetensors"))


def _rows(run: Path) -> list[tuple]:
    """Every metrics row as (stage, step, kind, loss): what must not depend on interruptions."""
    return [(r["stage"], r["step"], "world_size" in r, r.get("loss")) for r in read_metrics(run)]


@pytest.mark.slow
def test_twenty_kills_resume_to_the_uninterrupted_run(tiny_model_dir, tmp_path):
    ref_recipe, recipe, run = tmp_path / "ref.yaml", tmp_path / "run.yaml", tmp_path / "run"
    ref_recipe.write_text(yaml.safe_dump(recipe_raw(tiny_model_dir, tmp_path / "ref")))
    recipe.write_text(yaml.safe_dump(recipe_raw(tiny_model_dir, run)))
    launched = time.time()
    ref = _launch(ref_recipe, resume=False, log=tmp_path / "ref.log")
    _wait(ref, lambda: _training(tmp_path / "ref", launched))
    training = time.time()
    assert ref.wait() == 0, (tmp_path / "ref.log").read_text()
    step_seconds = (time.time() - training) / STEPS      # a step and its checkpoint write, on average
    reference = _rows(tmp_path / "ref")
    assert [r[:3] for r in reference] == ([(0, 0, True)] + [(0, s, False) for s in (1, 2, 3)] + [(1, 3, True)]
                                          + [(1, s, False) for s in (4, 5, 6)] + [(2, 6, True)]
                                          + [(2, s, False) for s in (7, 8, 9)])

    rng, hits = random.Random(0), []
    steps = sorted(rng.choices(range(1, STEPS + 1), k=KILLS - IN_WRITES - 3))    # kills move through all stages
    moments = [("write",)] * IN_WRITES + [("startup",)] * 3
    rng.shuffle(moments)
    moments = moments[:8] + [("step", n) for n in steps[:6]] + moments[8:] + [("step", n) for n in steps[6:]]
    for i, moment in enumerate(moments):
        seconds = {"write": rng.uniform(0.0, 0.5), "startup": rng.uniform(0.0, 4.0),
                   "step": rng.uniform(0.0, step_seconds)}[moment[0]]
        launched = time.time()
        proc = _launch(recipe, resume=i > 0, log=tmp_path / f"kill-{i}.log")
        hits.append(_kill(proc, launched, run, moment, seconds))
        assert hits[-1][0] != "finished", f"the run finished before all {KILLS} kills: {hits}"
        for path in ckpt.list_checkpoints(run):          # a kill never leaves a partial checkpoint under a step name
            assert ckpt.problems(path) == [], (i, path)
    print(json.dumps({"kills": hits, "step_seconds": round(step_seconds, 2)}))
    assert sum(where == "write" for where, _ in hits) >= IN_WRITES, hits
    assert {(step - 1) // 3 for where, step in hits if where != "startup"} == {0, 1, 2}, hits   # every stage hit

    final = _launch(recipe, resume=True, log=tmp_path / "final.log")
    err = (tmp_path / "final.log").read_text() if final.wait() else ""
    assert final.returncode == 0, err
    resumed = [(tmp_path / f"{name}.log").read_text() for name in [*(f"kill-{i}" for i in range(1, KILLS)), "final"]]
    assert not [log for log in resumed if "skipped newer checkpoint" in log]    # never met a partial checkpoint
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)) == []
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000008", "step-000009"]
    assert _rows(run) == reference
    want, got = _weights(tmp_path / "ref"), _weights(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def _launch_two(recipe: Path, resume: bool, log: Path) -> subprocess.Popen:
    """`accelerate launch` of 2 CPU processes in a session of their own (so that one SIGKILL reaches all three)."""
    cmd = train_on_two_processes(recipe)
    with log.open("w") as f:
        return subprocess.Popen(cmd + (["--resume", "auto"] if resume else []), env={**ENV, "ACCELERATE_USE_CPU": "1"},
                                stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)


@pytest.mark.slow
def test_kills_of_a_two_process_run_resume_to_the_uninterrupted_run(tiny_model_dir, tmp_path):
    """The launcher and both ranks killed at once (SIGKILL to the process group) in the SFT stage and again in the GRPO
    stage, at seeded moments after a step: `--resume auto` with 2 processes ends on the uninterrupted 2-process run's
    weights bit for bit, with each metrics row once."""
    raws = {name: recipe_raw(tiny_model_dir, tmp_path / name) for name in ("ref", "run")}
    for name, raw in raws.items():
        raw["stages"] = raw["stages"][:2]
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(raw))
    ref = _launch_two(tmp_path / "ref.yaml", resume=False, log=tmp_path / "ref.log")
    assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-3000:]

    run, rng = tmp_path / "run", random.Random(1)
    for i, after in enumerate([2, 4]):                      # a kill in each stage
        launched = time.time()
        proc = _launch_two(tmp_path / "run.yaml", resume=i > 0, log=tmp_path / f"kill-{i}.log")
        _wait(proc, lambda: _training(run, launched) and _last_step(run) >= after)
        assert proc.poll() is None, (tmp_path / f"kill-{i}.log").read_text()[-3000:]
        time.sleep(rng.uniform(0.0, 0.8))
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        for path in ckpt.list_checkpoints(run):
            assert ckpt.problems(path) == [], (i, path)
    final = _launch_two(tmp_path / "run.yaml", resume=True, log=tmp_path / "final.log")
    assert final.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
    assert _rows(run) == _rows(tmp_path / "ref")
    assert not [p for p in run.iterdir() if p.name.startswith(ckpt.TMP_PREFIX)]
    want, got = _weights(tmp_path / "ref"), _weights(run)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
