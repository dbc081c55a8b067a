"""Faults: a run stopped after a checkpoint resumes with metrics.jsonl holding each row once."""
from __future__ import annotations

import pytest

from posttrain.metrics import MetricsLog
from posttrain.trainer import train

from conftest import read_metrics, sft_recipe

TWO_STAGES = ["train.save_every=3", "train.keep_checkpoints=5",
              "stages=[{name: a, objectives: {sft: 1.0}, train: {steps: 4}},"
              " {name: b, objectives: {sft: 1.0}, train: {steps: 4}}]"]


class Stop(Exception):
    """Stands for the process dying right after a metrics row was written."""


def _crash_after(monkeypatch, step: int) -> None:
    """Make the run die right after it logs global step `step` (the row is in metrics.jsonl, nothing after it)."""
    log = MetricsLog.log

    def log_then_die(self, metrics, at):
        log(self, metrics, at)
        if at == step and "loss" in metrics:
            raise Stop(f"killed after step {step}")

    monkeypatch.setattr(MetricsLog, "log", log_then_die)


def _shape(rows: list[dict]) -> list[tuple]:
    """What must not depend on interruptions: each row's stage, step and kind (header or step)."""
    return [(r["stage"], r["step"], "world_size" in r) for r in rows]


@pytest.mark.parametrize("crash_after,resumes_from", [(6, 4), (8, 7)])
def test_resumed_metrics_hold_each_row_once(tiny_model_dir, tmp_path, monkeypatch, crash_after, resumes_from):
    """Stopped after checkpoint `resumes_from` with later steps already logged (crash after 6: the last checkpoint
    ends stage a, so stage b's header row is logged after it too; after 8: mid stage b), then `--resume auto`: the
    file equals the uninterrupted run's, row for row (stage, step, kind; the same losses)."""
    train(sft_recipe(tiny_model_dir, tmp_path / "full", overrides=TWO_STAGES))
    full = read_metrics(tmp_path / "full")
    assert _shape(full) == [(0, 0, True), (0, 1, False), (0, 2, False), (0, 3, False), (0, 4, False),
                            (1, 4, True), (1, 5, False), (1, 6, False), (1, 7, False), (1, 8, False)]

    recipe = sft_recipe(tiny_model_dir, tmp_path / "run", overrides=TWO_STAGES)
    with monkeypatch.context() as m:
        _crash_after(m, crash_after)
        with pytest.raises(Stop):
            train(recipe)
    logged = [r["step"] for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert logged == list(range(1, crash_after + 1))                          # steps past the checkpoint were logged
    assert sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())[-1] == f"step-{resumes_from:06d}"
    with (tmp_path / "run/metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "los')                                            # a row cut short by the kill

    train(recipe, resume="auto")
    rows = read_metrics(tmp_path / "run")
    assert _shape(rows) == _shape(full)
    assert [r.get("loss") for r in rows] == pytest.approx([r.get("loss") for r in full], abs=1e-6)


def test_resume_into_a_fresh_directory_logs_the_stage_header(tiny_model_dir, tmp_path):
    """Resuming another run's checkpoint into a new output_dir: its metrics.jsonl starts with the resumed stage's
    header at the checkpoint's step, then the remaining steps."""
    train(sft_recipe(tiny_model_dir, tmp_path / "full", steps=5, overrides=["train.save_every=3"]))
    train(sft_recipe(tiny_model_dir, tmp_path / "other", steps=5), resume=str(tmp_path / "full/checkpoints/step-000003"))
    assert _shape(read_metrics(tmp_path / "other")) == [(0, 3, True), (0, 4, False), (0, 5, False)]
