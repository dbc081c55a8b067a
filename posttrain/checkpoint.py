"""Checkpoints: accelerate's state (model, optimizer, RNG of every process) plus the trainer's own state.

Layout of RUN_DIR/checkpoints/step-000120/:
  model.safetensors, optimizer.bin, random_states_<rank>.pkl   (accelerator.save_state)
  trainer_state.json   stage index and name, step in stage (= data position), global step, scheduler, extras
A checkpoint is written into a temporary directory and renamed when complete, so a crash never leaves a
half-written checkpoint where `--resume auto` would pick it up.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

STATE_FILE = "trainer_state.json"


@dataclass
class RunState:
    stage: int = 0            # index of the stage being run
    stage_name: str = ""
    step: int = 0             # optimizer steps done in this stage; the data position is step * batch_size
    global_step: int = 0      # optimizer steps done in the whole run
    scheduler: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)   # e.g. mixer / controller state of later objectives


def save(accelerator, run_dir: Path, state: RunState, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{state.global_step:06d}"
    tmp = root / f".tmp-step-{state.global_step:06d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step-*") if (p / STATE_FILE).is_file()) if root.is_dir() else []


def resolve(run_dir: Path, resume: str) -> Path:
    """`auto` = the newest complete checkpoint of the run; else a checkpoint directory."""
    if resume == "auto":
        found = list_checkpoints(run_dir)
        if not found:
            raise FileNotFoundError(f"--resume auto: no checkpoint under {Path(run_dir) / 'checkpoints'}")
        return found[-1]
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(f"--resume {resume}: not a posttrain checkpoint (no {STATE_FILE} in it)")
    return path


def read_state(path: Path) -> RunState:
    return RunState(**json.loads((Path(path) / STATE_FILE).read_text()))
