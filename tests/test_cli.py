"""The command line: --help everywhere, list, config show, eval, tiny-model; the GSM8K SFT recipe runs offline."""
import json
import subprocess
import sys

import pytest
import yaml

from posttrain.cli import main
from posttrain.config import load_recipe
from posttrain.trainer import train

from conftest import REPO, read_metrics, tiny_recipe_overrides


def _run(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "posttrain", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.parametrize("args", [[], ["train"], ["tiny-model"], ["config"], ["config", "show"], ["eval"], ["list"]])
def test_help_everywhere(args):
    with pytest.raises(SystemExit) as e:
        main([*args, "--help"])
    assert e.value.code == 0


def test_list_has_a_heading_per_registry(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out.splitlines()
    for heading in ("objectives:", "aggregations:", "rewards:", "rollout engines:", "tasks:"):
        assert heading in out
    assert "  sft" in out and "  token_mean" in out and "  exact" in out and "  arithmetic" in out


def test_config_show_prints_the_resolved_recipe(capsys):
    assert main(["config", "show", str(REPO / "recipes/quickstart.yaml"), "optim.lr=1e-4"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["stages"][0]["optim"]["lr"] == 1e-4
    assert shown["stages"][0]["schedule"]["name"] == "constant"
    assert shown["stages"][1]["optim"]["lr"] == 3e-4       # a stage's own setting wins over the top-level default


def test_config_show_doc_lists_every_key_with_type_default_and_help(capsys):
    import dataclasses

    from posttrain.config import OptimConfig
    from posttrain.objectives import OBJECTIVES

    assert main(["config", "show", "--doc"]) == 0
    full = capsys.readouterr().out
    assert "optim.lr: float = 1.0e-05\n    peak learning rate\n" in full
    assert "schedule.name: cosine | linear | constant = cosine\n" in full
    assert "rewards.N.factory: mapping of str -> any | null = null\n" in full
    assert "stages.N.objectives: mapping of str -> float = (required)\n" in full
    for name in OBJECTIVES.names():                    # every registered objective's own settings
        for f in dataclasses.fields(OBJECTIVES.get(name).config_cls):
            if f.name != "type":
                assert f"\nobjectives.{name}.{f.name}: " in full, (name, f.name)
    assert main(["config", "show", "--doc", "optim"]) == 0
    section = capsys.readouterr().out
    assert [line.split(":")[0] for line in section.splitlines() if not line.startswith(" ")] == \
        ["optim"] + [f"optim.{f.name}" for f in dataclasses.fields(OptimConfig)]
    assert main(["config", "show", "--doc", "rollout.sampling"]) == 0
    assert capsys.readouterr().out.startswith("rollout.sampling: SamplingConfig\n")
    assert main(["config", "show", "--doc", "optim.lrr"]) == 2
    assert "--doc: no recipe key 'optim.lrr'; sections: data, eval" in capsys.readouterr().err


def test_bad_override_is_a_clean_error():
    proc = _run("config", "show", "recipes/quickstart.yaml", "optim.lr=abc", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("posttrain: error: recipes/quickstart.yaml: optim.lr: expected a number, "
                                   "got 'abc' (str)")


def _arithmetic_test_rows(n: int) -> list[dict]:
    from posttrain.data import DataConfig, load_rows

    rows, _ = load_rows(DataConfig(source="task:arithmetic", split="test", limit=n), "data")
    return rows


def test_tiny_model_and_eval_commands(tmp_path):
    _run("tiny-model", str(tmp_path / "m"), "hidden_size=32", "num_heads=2", "num_kv_heads=1", "intermediate_size=64")
    assert (tmp_path / "m/config.json").is_file()
    proc = _run("eval", str(tmp_path / "m"), "task:arithmetic", "num_samples=8", "max_new_tokens=4",
                "--output", str(tmp_path / "ev.jsonl"))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = [json.loads(x) for x in (tmp_path / "ev.jsonl").read_text().splitlines()]
    assert len(rows) == result["eval/num_samples"] == 8 and {"prompt", "completion", "correct"} <= set(rows[0])
    assert {r["correct"] for r in rows} <= {0.0, 1.0}
    assert result["eval/accuracy"] == sum(r["correct"] for r in rows) / 8     # the verdicts it wrote, averaged
    from posttrain.rewards import exact  # the default verifier, re-applied
    answers = [row["answer"] for row in _arithmetic_test_rows(8)]
    assert [r["correct"] for r in rows] == exact([r["prompt"] for r in rows], [r["completion"] for r in rows],
                                                 answer=answers)


def test_gsm8k_sft_recipe_runs_offline(tiny_model_dir, tmp_path, gsm8k_dir):
    base = tiny_recipe_overrides(tiny_model_dir, tmp_path / "run")
    recipe = load_recipe(REPO / "recipes/gsm8k/qwen2.5-0.5b-sft.yaml", base + [
        f"data.source={gsm8k_dir / 'train.jsonl'}", "data.limit=64", "model.dtype=float32",
        "model.gradient_checkpointing=false", "model.precision=fp32", "train.batch_size=8", "train.micro_batch_size=4",
        "train.log_every=1", "stages.0.train.steps=3", "stages.0.train.epochs=null", "stages.0.train.eval_every=0",
        f"eval.data.source={gsm8k_dir / 'test.jsonl'}", "eval.num_samples=4", "eval.max_new_tokens=8",
        "eval.batch_size=4", "train.save_every=0"])
    result = train(recipe)
    rows = read_metrics(tmp_path / "run")
    assert rows[0]["data/examples"] + rows[0]["data/dropped_overlong"] == 64
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert result["eval/num_samples"] == 4
