"""Each kind of bad recipe gives its own message naming the file, the key path, what was given and what is allowed."""
import pytest
import yaml

from posttrain.config import load_recipe
from posttrain.configlib import ConfigError
from posttrain.data import DataConfig, load_rows, to_examples

from conftest import REPO

QUICKSTART = REPO / "recipes/quickstart.yaml"


def _error(overrides, path=QUICKSTART) -> str:
    with pytest.raises(ConfigError) as e:
        load_recipe(path, overrides)
    return str(e.value)


def test_valid_recipe_and_overrides():
    r = load_recipe(QUICKSTART, ["optim.lr=1e-5", "stages.0.train.steps=7", "data.task.digits=3"])
    stage = r.stages[0]
    assert stage.optim.lr == 1e-5 and stage.train.steps == 7 and stage.data.task["digits"] == 3
    assert stage.optim.betas == (0.9, 0.95)  # defaults filled in


@pytest.mark.parametrize("overrides, expected", [
    (["optim.lrr=3"], "recipes/quickstart.yaml: optim.lrr: unknown key; allowed keys here: betas, eps, lr, "
                      "max_grad_norm, weight_decay"),
    (["optim.lr=abc"], "recipes/quickstart.yaml: optim.lr: expected a number, got 'abc' (str)"),
    (["stages.0.train.batch_size=x"], "stages.0.train.batch_size: expected an integer, got 'x' (str)"),
    (["optim.lr=-1"], "optim.lr: must be > 0, got -1.0"),
    (["schedule.name=exp"], "schedule.name: got 'exp' (str); allowed: 'cosine', 'linear', 'constant'"),
    (["model.dtype=int8"], "model.dtype: got 'int8' (str); allowed: 'float32', 'bfloat16', 'float16'"),
    (["objectives.sft.aggregation=mean"], "objectives.sft.aggregation: got 'mean'; allowed: seq_mean_token_mean, "
                                          "seq_mean_token_sum_norm, token_mean"),
    (["objectives.sft.type=sftt"], "objectives.sft.type: unknown objective 'sftt'; registered:"),
    (["stages.0.objectives.grpo_typo=1.0"],
     "stages.0.objectives.grpo_typo: not defined under `objectives:`; defined: grpo, sft"),
    (["stages.3.train.steps=1"], "stages.3: index '3' out of range (the list has 2 items)"),
    (["optim.betas=[0.9]"], "optim.betas: expected a list of 2 values, got 1"),
    (["data.columns.gold=answer"],
     "data.columns: unknown role(s) ['gold']; allowed roles: prompt, completion, messages, answer"),
    (["stages.0.train.steps=null"], "stages.0.train.steps: give the stage a length: steps or epochs"),
    (["model.tiny.hidden_size=130"], "model.tiny.hidden_size: must be divisible by num_heads (4), got 130"),
])
def test_bad_values_name_the_key(overrides, expected):
    assert expected in _error(overrides)


def test_missing_required_values(tmp_path):
    raw = yaml.safe_load(QUICKSTART.read_text())
    del raw["output_dir"]
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert f"{path}: output_dir: required value missing" in _error([], path)
    raw = yaml.safe_load(QUICKSTART.read_text())
    del raw["model"]["path"]
    path.write_text(yaml.safe_dump(raw))
    assert "model.path: required value missing" in _error([], path)
    raw = yaml.safe_load(QUICKSTART.read_text())
    del raw["data"]
    path.write_text(yaml.safe_dump(raw))
    assert "stages.0.data: required value missing" in _error([], path)


def test_unreadable_recipes(tmp_path):
    assert "recipe file not found" in _error([], tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    assert "not valid YAML" in _error([], bad)
    bad.write_text("- 1\n- 2\n")
    assert "a recipe must be a mapping" in _error([], bad)
    assert "must look like key.path=value" in _error(["optim.lr"])


def test_data_errors_name_file_column_and_row(tmp_path):
    f = tmp_path / "d.jsonl"
    with pytest.raises(FileNotFoundError, match=r"data.source: data file .*d.jsonl' not found"):
        load_rows(DataConfig(source=str(f)))
    f.write_text("")
    with pytest.raises(Exception, match="empty"):
        load_rows(DataConfig(source=str(f)))
    f.write_text('{"question": "q1", "answer": "a1"}\n')
    cfg = DataConfig(source=str(f), columns={"prompt": "query"})
    rows, cols = load_rows(cfg)
    with pytest.raises(ConfigError,
                       match=r"data.columns.prompt: column 'query' not in .*; its columns: answer, question"):
        to_examples(rows, cols, cfg)
    with pytest.raises(ConfigError, match=r"data.source: unknown task 'nope'"):
        load_rows(DataConfig(source="task:nope"))
    with pytest.raises(ConfigError, match=r"data.task.digits: must be in 1..9, got 0"):
        load_rows(DataConfig(source="task:arithmetic", task={"digits": 0}))
    with pytest.raises(ConfigError, match=r"data.task.colour: unknown key"):
        load_rows(DataConfig(source="task:arithmetic", task={"colour": 1}))
