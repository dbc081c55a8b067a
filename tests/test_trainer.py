"""Trainer invariances: gradient accumulation, resume == uninterrupted, checkpoint round trip, the loss falls."""
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from posttrain.trainer import Trainer, train

from conftest import read_metrics, sft_recipe


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def _step_rows(run_dir):
    return [r for r in read_metrics(run_dir) if "loss" in r]


def test_grad_accumulation_8x1_equals_1x8(tiny_model_dir, tmp_path):
    one = sft_recipe(tiny_model_dir, tmp_path / "one", steps=1,
                     overrides=["train.micro_batch_size=8", "schedule.warmup_steps=0"])
    eight = sft_recipe(tiny_model_dir, tmp_path / "eight", steps=1,
                       overrides=["train.micro_batch_size=1", "schedule.warmup_steps=0"])
    train(one), train(eight)
    a, b = _step_rows(tmp_path / "one")[0], _step_rows(tmp_path / "eight")[0]
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # the accumulated gradient, not just Adam's sign
    wa, wb, w0 = _weights(tmp_path / "one/final"), _weights(tmp_path / "eight/final"), _weights(tiny_model_dir)
    assert max((wa[k] - w0[k]).abs().max().item() for k in w0) > 1e-4  # the step did move the weights
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6


def test_resume_equals_uninterrupted(tiny_model_dir, tmp_path):
    full = sft_recipe(tiny_model_dir, tmp_path / "full", steps=6, overrides=["stages.0.train.save_every=3",
                                                                           "train.keep_checkpoints=5"])
    train(full)
    ckpt = tmp_path / "full/checkpoints/step-000003"
    assert ckpt.is_dir()
    resumed = sft_recipe(tiny_model_dir, tmp_path / "resumed", steps=6)
    train(resumed, resume=str(ckpt))
    full_rows, resumed_rows = _step_rows(tmp_path / "full"), _step_rows(tmp_path / "resumed")
    assert [r["step"] for r in resumed_rows] == [4, 5, 6]
    for a, b in zip(full_rows[3:], resumed_rows):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7) and a["lr"] == pytest.approx(b["lr"], abs=1e-12)
    wa, wb = _weights(tmp_path / "full/final"), _weights(tmp_path / "resumed/final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_checkpoint_round_trip_gives_identical_logits(tiny_model_dir, tmp_path):
    trainer = Trainer(sft_recipe(tiny_model_dir, tmp_path / "run", steps=3))
    trainer.run()
    ids = torch.tensor([[1, 20, 21, 22, 13, 30, 2]])
    live = trainer.accelerator.unwrap_model(trainer.model).eval()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run/final").eval()
    with torch.no_grad():
        assert torch.equal(live(ids).logits, reloaded(ids).logits)
    state = (tmp_path / "run/checkpoints").iterdir().__next__()
    for name in ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json"):
        assert (state / name).is_file(), name


@pytest.mark.slow
def test_tiny_end_to_end_learns(tiny_model_dir, tmp_path, one_thread):
    """1-digit addition: the loss falls and held-out greedy accuracy passes a threshold."""
    recipe = sft_recipe(tiny_model_dir, tmp_path / "e2e", steps=250, overrides=[
        "train.batch_size=32", "train.micro_batch_size=32", "optim.lr=3e-3", "train.log_every=25",
        "eval.data.source=task:arithmetic", "eval.data.split=test", "eval.num_samples=64", "eval.max_new_tokens=12",
        "eval.data.task.digits=1", "eval.data.task.ops=+", "eval.data.task.num_examples=64"])
    result = train(recipe)
    rows = _step_rows(tmp_path / "e2e")
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"]
    assert result["eval/accuracy"] >= 0.9, result


def test_max_minutes_ends_a_stage_early_and_the_next_one_runs(tiny_model_dir, tmp_path):
    """A spent wall-time budget ends its stage after the step that spent it (its final checkpoint is written); the
    following stage then runs its own steps."""
    raw_stages = ('stages=[{name: capped, objectives: {sft: 1.0}, train: {steps: 1000, max_minutes: 1.0e-6}}, '
                  '{name: after, objectives: {sft: 1.0}, train: {steps: 2}}]')
    train(sft_recipe(tiny_model_dir, tmp_path, overrides=[raw_stages]))
    rows = _step_rows(tmp_path)
    assert [(r["stage"], r["step"]) for r in rows] == [(0, 1), (1, 2), (1, 3)]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir())[-1] == "step-000003"
    with pytest.raises(Exception, match=r"max_minutes: must be > 0"):
        sft_recipe(tiny_model_dir, tmp_path / "bad", overrides=["stages.0.train.max_minutes=0"])


def test_progress_bar_shows_the_mean_reward_of_the_last_ten_steps():
    from posttrain.metrics import Progress

    bar = Progress(False, total=20, initial=0, desc="grpo")
    for step in range(12):
        bar.update({"loss": 0.0, "reward/mean": float(step)})
    assert bar.fields["reward(10)"] == "6.500"                     # mean of steps 2..11
    bar.update({"loss": 0.0, "eval/accuracy": 0.5})               # a row without a reward shows none
    assert "reward(10)" not in bar.fields and bar.fields["acc"] == "0.500"


def test_progress_is_plain_lines_when_not_a_terminal():
    """CI and SLURM logs are not terminals: one plain line per `interval` seconds (0 here: every step) and one at
    the end, never a redrawn bar; with a long interval only the final line."""
    import io

    from posttrain.metrics import Progress

    log = io.StringIO()
    bar = Progress(True, total=3, initial=0, desc="sft", file=log, interval=0.0)
    for loss in (0.5, 0.25, 0.125):
        bar.update({"loss": loss, "tokens_per_s": 1000.0})
    bar.close()
    lines = log.getvalue().splitlines()
    assert [line.split(" elapsed")[0] for line in lines] == [
        "sft: step 1/3 loss 0.5000 tok/s 1000", "sft: step 2/3 loss 0.2500 tok/s 1000",
        "sft: step 3/3 loss 0.1250 tok/s 1000"]                  # close adds nothing: step 3 was printed
    assert "\r" not in log.getvalue() and lines[-1].endswith("eta 00:00")

    log = io.StringIO()
    bar = Progress(True, total=5, initial=2, desc="grpo", file=log, interval=3600.0)   # resumed at step 2
    for _ in range(3):
        bar.update({"loss": 0.0, "reward/mean": 1.0})
    bar.close()
    assert log.getvalue().startswith("grpo: step 5/5 loss 0.0000 tok/s 0 reward(10) 1.000 elapsed ")
    assert len(log.getvalue().splitlines()) == 1


def test_progress_is_a_bar_on_a_terminal():
    import fcntl
    import os
    import struct
    import termios

    from posttrain.metrics import Progress

    master, replica = os.openpty()
    fcntl.ioctl(replica, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))   # a fresh pty is 0 columns wide
    with os.fdopen(replica, "w") as tty:
        bar = Progress(True, total=2, initial=0, desc="sft", file=tty, interval=0.0)
        bar.update({"loss": 1.0})
        bar.update({"loss": 0.5})
        bar.close()
    out = os.read(master, 4096).decode()
    os.close(master)
    assert bar.tty and "\r" in out and "sft: 2/2" in out and "step 2/2" not in out


def test_reward_summary_line():
    from posttrain.trainer import reward_summary

    line = reward_summary("grpo", [0.0] * 15 + [0.5] * 120 + [0.3] * 15, 0.426)
    assert line == ("stage grpo: reward/mean 0.000 (first 15 steps) -> 0.300 (last 15 steps) over 150 steps; "
                    "eval/accuracy 0.426")
