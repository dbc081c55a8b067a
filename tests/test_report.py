"""`posttrain report`: PNG figures and report.md from metrics.jsonl, on real runs; named errors for bad files."""
from __future__ import annotations

import json

import pytest

from posttrain.cli import main
from posttrain.config import load_recipe
from posttrain.report import ReportError, read_run, write_report
from posttrain.trainer import train

from conftest import REPO, read_metrics, sft_recipe, tiny_recipe_overrides

pytest.importorskip("matplotlib")


def _png_panels(path) -> dict[str, list[str]]:
    """The panels -> runs a report PNG says it holds (its tEXt 'Description'), after checking it is a real image."""
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > 300 and image.size[1] > 200
        return json.loads(image.text["Description"])


@pytest.mark.slow
def test_report_of_an_rl_run_and_an_sft_run(tiny_model_dir, tmp_path, capsys):
    rl = load_recipe(REPO / "recipes/quickstart.yaml", tiny_recipe_overrides(tiny_model_dir, tmp_path / "rl") + [
        "train.log_every=1", "stages.0.train.steps=3", "stages.0.train.eval_every=3", "stages.1.train.steps=2",
        "stages.1.train.eval_every=2", "rollout.prompts_per_step=4", "rollout.sampling.n=4",
        "rollout.sampling.max_new_tokens=12", "eval.num_samples=8", "eval.max_new_tokens=12"])
    train(rl)
    train(sft_recipe(tiny_model_dir, tmp_path / "sft", steps=3))

    assert main(["report", str(tmp_path / "rl"), str(tmp_path / "sft"), "--out", str(tmp_path / "report")]) == 0
    assert "report: " in capsys.readouterr().out
    out = tmp_path / "report"
    both, rl_only = ["rl", "sft"], ["rl"]
    expected = {"loss": {"loss": both, "loss/grpo": rl_only, "loss/policy": rl_only, "loss/sft": both},
                "optimizer": {"lr": both, "grad_norm": both},
                "throughput": {"tokens_per_s": both},
                "reward": {"reward/mean": rl_only, "reward/std": rl_only, "frac_reward_zero_std": rl_only,
                           "reward/steps/mean": rl_only},
                "kl_entropy": {"entropy": rl_only},
                "clipping": {"clip_ratio/dual": rl_only, "clip_ratio/high": rl_only, "clip_ratio/low": rl_only,
                             "completion/clipped_ratio": rl_only},
                "length": {"completion/mean_length": rl_only, "completion/min_length": rl_only,
                           "completion/max_length": rl_only},
                "eval": {"eval/accuracy": rl_only},
                "time": {f"time/{k}": rl_only for k in ("generate", "logprobs", "reward", "sync")}
                | {"time/step": both, "time/train": both},
                "mix": {"mix/grpo": rl_only, "mix/sft": both}}     # every stage logs its (here constant) weights
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{g}.png" for g in expected)
    for group, panels in expected.items():
        assert _png_panels(out / f"{group}.png") == panels, group

    md = (out / "report.md").read_text()
    accuracy = [r["eval/accuracy"] for r in read_metrics(tmp_path / "rl") if "eval/accuracy" in r]
    assert len(accuracy) == 2
    best = max(accuracy)
    assert f"| rl | {accuracy[-1]:.4f} (5) | {best:.4f} ({3 if accuracy[0] == best else 5}) |" in md
    assert "| sft | not evaluated | |" in md
    assert "| rl | 0 (sft) | 0..3 |" in md and "| rl | 1 (grpo) | 3..5 |" in md and "| sft | 0 (sft) | 0..3 |" in md
    assert md.count("| rl | ") == 5 and "![time](time.png)" in md                 # runs, eval, 2 stages, time split


def test_time_split_and_mix_panels_by_hand(tmp_path):
    rows = [{"step": 0, "stage": 0, "world_size": 1, "time": 100.0},
            {"step": 1, "stage": 0, "loss": 1.0, "mix/sft": 0.75, "mix/grpo": 0.25, "time/step": 2.0,
             "time/generate": 1.0, "time/reward": 0.5, "time/train": 0.5, "time": 102.0},
            {"step": 2, "stage": 0, "loss": "nan", "mix/sft": 0.5, "mix/grpo": 0.5, "time/step": 4.0,
             "time/generate": 3.0, "time/reward": 0.5, "time/train": 0.5, "time": 3761.0}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = read_run(tmp_path / "run")
    assert run.series["mix/sft"] == [(1, 0.75), (2, 0.5)] and str(run.series["loss"][1][1]) == "nan"
    shown = write_report([tmp_path / "run"], tmp_path / "out")
    assert shown["mix"] == {"mix/grpo": ["run"], "mix/sft": ["run"]}
    md = (tmp_path / "out/report.md").read_text()
    # means: generate 2.0, reward 0.5, train 0.5 of a 3.0 s step; stage 0 from t=100 to t=3761
    assert "| run | 2.000 (67%) | 0.500 (17%) | - | 0.500 (17%) | - | 3.000 |" in md
    assert "| run | 0 | 0..2 | 1:01:01 |" in md


@pytest.mark.parametrize("content,message", [
    ("", r"metrics.jsonl: empty: no logged step"),
    ('{"step": 1, "loss": 1.0}\n{"step": 2, "loss": 0.5\n', r"metrics.jsonl:2: not valid JSON"),
    ('{"step": 1}\n[1, 2]\n', r"metrics.jsonl:2: expected a JSON object with an integer 'step'"),
    ('{"loss": 1.0}\n', r"metrics.jsonl:1: expected a JSON object with an integer 'step'"),
    ('{"step": 0, "stage": 0, "world_size": 1}\n', r"no metric to plot"),
])
def test_bad_metrics_files_are_named_errors(tmp_path, capsys, content, message):
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text(content)
    with pytest.raises(ReportError, match=message):
        write_report([tmp_path / "run"], tmp_path / "out")
    assert main(["report", str(tmp_path / "run")]) == 2                             # the CLI: one line, no traceback
    err = capsys.readouterr().err
    assert err.startswith(f"posttrain: error: {tmp_path / 'run'}") and "Traceback" not in err


def test_a_directory_without_metrics(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == (f"posttrain: error: {tmp_path}: no metrics.jsonl here "
                                               "(is it a run directory?)")
