"""Bad inputs to `posttrain train`: each one stops with exit code 2 and one line naming the recipe file, the key, what
was given and what is allowed, before any weights load and before anything is written (posttrain/preflight.py)."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from posttrain import checkpoint as ckpt
from posttrain.cli import main
from posttrain.config import parse_recipe
from posttrain.preflight import record_recipe

from conftest import REPO, read_metrics, sft_recipe_raw

ROWS = [{"question": f"What is {a} + {b}?", "solution": f"{a}+{b}={a + b}\n#### {a + b}", "answer": str(a + b)}
        for a, b in [(1, 2), (3, 4), (5, 1), (2, 2)]]


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft_raw(model_dir: Path, tmp_path: Path, overrides: list[str] | None = None) -> dict:
    """The conftest SFT recipe on a small JSONL file (data.source = tmp_path/data.jsonl)."""
    data = _jsonl(tmp_path / "data.jsonl", ROWS)
    return sft_recipe_raw(model_dir, tmp_path / "run", overrides=[
        f"data={{source: {data}, max_length: 48, columns: {{prompt: question, completion: solution}}}}",
        *(overrides or [])])


def rl_raw(model_dir: Path, tmp_path: Path, overrides: list[str] | None = None) -> dict:
    """A GRPO recipe on the same file, with the `exact` reward."""
    return sft_raw(model_dir, tmp_path, [
        "data.columns={prompt: question, answer: answer}", "objectives={grpo: {}}",
        "stages=[{name: rl, objectives: {grpo: 1.0}, train: {steps: 2}}]", "rewards=[{name: exact}]",
        "rollout={prompts_per_step: 2, sampling: {n: 2, max_new_tokens: 4}}", *(overrides or [])])


@pytest.fixture
def no_training(monkeypatch):
    """Training must not start: a bad input has to stop in the preflight."""
    def refuse(*args, **kwargs):
        raise AssertionError("the preflight passed and training started")

    monkeypatch.setattr("posttrain.trainer.train", refuse)


def run_train(tmp_path: Path, raw: dict, *args: str, capsys, named: bool = True) -> str:
    """`posttrain train tmp_path/recipe.yaml *args` in this process. Asserts exit code 2, one error line and no
    traceback, the recipe file named first (`named`), and no new run directory; returns the rest of the line."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    existed = Path(raw["output_dir"]).exists()
    capsys.readouterr()
    code = main(["train", str(recipe), *args])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [x for x in err.splitlines() if x.startswith("posttrain: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert existed or not Path(raw["output_dir"]).exists(), "the run directory was created"
    message = lines[0][len("posttrain: error: "):]
    if named:
        assert message.startswith(f"{recipe}: "), message
        message = message[len(f"{recipe}: "):]
    return message


def expect(message: str, pattern: str) -> None:
    assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


# ------------------------------------------------------------------------------------------------------ model
def _model_copy(tiny_model_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_model_path_that_does_not_exist(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, [f"model.path={tmp_path / 'no-model'}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"model\.path: '.*/no-model' does not exist; expected a model directory \(config\.json and weights\), "
           r"'tiny' \(the embedded model\) or a hub name")


def test_model_path_that_is_not_a_model_directory(tiny_model_dir, tmp_path, capsys, no_training):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/readme.txt").write_text("not a model")
    raw = sft_raw(tiny_model_dir, tmp_path, [f"model.path={tmp_path / 'notes'}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"model\.path: '.*/notes' is not a model directory: it has no config\.json \(it holds: readme\.txt\)")


def test_model_path_that_is_a_file(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, [f"model.path={tiny_model_dir / 'config.json'}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"model\.path: '.*config\.json' is a file; expected a model directory")


def test_model_directory_without_weights(tiny_model_dir, tmp_path, capsys, no_training):
    model = _model_copy(tiny_model_dir, tmp_path)
    (model / "model.safetensors").unlink()
    raw = sft_raw(tiny_model_dir, tmp_path, [f"model.path={model}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"model\.path: '.*/model' has a config\.json but no weights "
                                                    r"\(\*\.safetensors, pytorch_model\*\.bin")


def test_model_config_that_does_not_parse(tiny_model_dir, tmp_path, capsys, no_training):
    model = _model_copy(tiny_model_dir, tmp_path)
    (model / "config.json").write_text('{"model_type": "qwen2",')
    raw = sft_raw(tiny_model_dir, tmp_path, [f"model.path={model}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"model\.path: cannot read the model config of '.*/model': ")


def test_tokenizer_without_a_chat_template(tiny_model_dir, tmp_path, capsys, no_training):
    model = _model_copy(tiny_model_dir, tmp_path)
    (model / "chat_template.jinja").unlink()
    raw = sft_raw(tiny_model_dir, tmp_path, [f"model.path={model}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.data\.prompt_template: the tokenizer of '.*/model' has no chat template; give a prompt "
           r"template with \{prompt\}")


def test_hub_name_that_cannot_be_reached(tiny_model_dir, tmp_path, capsys, no_training, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)     # as HF_HUB_OFFLINE=1 does: no retries
    raw = sft_raw(tiny_model_dir, tmp_path, ["model.path=no-such-org/no-such-model"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"model\.path: cannot read the model config of 'no-such-org/no-such-model': OSError")


# ------------------------------------------------------------------------------------------------------- data
def _data(tmp_path: Path, name: str, content: bytes | str) -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


GOOD = json.dumps(ROWS[0]) + "\n"
DATA_CASES = {
    "missing file": (None, r"stages\.0\.data\.source: data file '.*/missing\.jsonl' not found"),
    "empty file": ("", r"stages\.0\.data\.source: data file '.*/d\.jsonl' is empty"),
    "only blank lines": ("\n\n  \n", r"stages\.0\.data\.source: data file '.*/d\.jsonl' is empty"),
    "malformed JSON line": (GOOD + '{"question": "What is 1 + 1?", "solution": \n' + GOOD,
                            r"stages\.0\.data\.source: could not read '.*/d\.jsonl': line 2: not valid JSON "
                            r"\(Expecting value at column \d+\)"),
    "not UTF-8": ((GOOD + GOOD).encode() + b'{"question": "\xff\xfe"}\n',
                  r"could not read '.*/d\.jsonl': line 3: not UTF-8 text"),
    "a line that is not an object": (GOOD + "[1, 2]\n",
                                     r"could not read '.*/d\.jsonl': line 2: expected a JSON object \(one row\), "
                                     r"got list \[1, 2\]"),
    "a prompt whose type changes": (GOOD + GOOD + json.dumps({**ROWS[1], "question": 12}) + "\n",
                                    r"stages\.0\.data\.columns\.prompt: '.*/d\.jsonl' line 3: column 'question' must "
                                    r"be text or a list of chat messages, got int 12"),
    "a null completion after a blank line": (GOOD + "\n" + GOOD + json.dumps({**ROWS[1], "solution": None}) + "\n",
                                             r"stages\.0\.data\.columns\.completion: '.*/d\.jsonl' line 4: column "
                                             r"'solution' must be text or a list of chat messages, got NoneType None"),
}


@pytest.mark.parametrize("case", list(DATA_CASES))
def test_unreadable_data_file_names_the_line(tiny_model_dir, tmp_path, capsys, no_training, case):
    content, pattern = DATA_CASES[case]
    path = tmp_path / "missing.jsonl" if content is None else _data(tmp_path, "d.jsonl", content)
    raw = sft_raw(tiny_model_dir, tmp_path, [f"data.source={path}"])
    expect(run_train(tmp_path, raw, capsys=capsys), pattern)


def test_data_source_that_is_a_directory(tiny_model_dir, tmp_path, capsys, no_training):
    (tmp_path / "rows.jsonl").mkdir()
    raw = sft_raw(tiny_model_dir, tmp_path, [f"data.source={tmp_path / 'rows.jsonl'}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"stages\.0\.data\.source: '.*/rows\.jsonl' is a directory; "
                                                    r"expected a data file \(\.jsonl, \.json, \.parquet, \.csv\)")


def test_data_file_of_unknown_format(tiny_model_dir, tmp_path, capsys, no_training):
    path = _data(tmp_path, "rows.txt", "What is 1 + 2?\n")
    raw = sft_raw(tiny_model_dir, tmp_path, [f"data.source={path}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"stages\.0\.data\.source: '.*/rows\.txt' has an unknown format; "
                                                    r"expected one of \.jsonl, \.json, \.parquet, \.csv")


def test_unknown_task(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, ["data={source: 'task:nope'}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"stages\.0\.data\.source: unknown task 'nope'; registered: "
                                                    r"arithmetic")


def test_mapped_column_missing(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, ["data.columns.prompt=query"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"stages\.0\.data\.columns\.prompt: column 'query' not in "
                                                    r"'.*/data\.jsonl'; its columns: answer, question, solution")


def test_no_prompt_column(tiny_model_dir, tmp_path, capsys, no_training):
    _jsonl(tmp_path / "qa.jsonl", [{"q": "What is 1 + 2?", "a": "3"}])
    raw = sft_raw(tiny_model_dir, tmp_path, [f"data={{source: {tmp_path / 'qa.jsonl'}}}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"stages\.0\.data\.columns: no prompt: map the role 'prompt' or "
                                                    r"'messages' to a column of '.*/qa\.jsonl' \(its columns: a, q\)")


@pytest.mark.parametrize("role,column,value,expected", [
    ("prompt", "question", 12, "text or a list of chat messages, got int 12"),
    ("completion", "solution", {"text": "3"}, r"text or a list of chat messages, got dict \{'text': '3'\}"),
])
def test_column_of_the_wrong_type(tiny_model_dir, tmp_path, capsys, no_training, role, column, value, expected):
    rows = [dict(r) for r in ROWS]
    for r in rows[1:]:
        r[column] = value                         # rows 2-4 (lines 2-4) consistently typed: the file itself reads
    rows[0][column] = value
    _jsonl(tmp_path / "typed.jsonl", rows)
    raw = sft_raw(tiny_model_dir, tmp_path, [f"data.source={tmp_path / 'typed.jsonl'}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           rf"stages\.0\.data\.columns\.{role}: '.*/typed\.jsonl' line 1: column '{column}' must be {expected}")


def test_messages_column_that_is_not_a_conversation(tiny_model_dir, tmp_path, capsys, no_training):
    _jsonl(tmp_path / "chat.jsonl", [{"messages": "hello"}, {"messages": "again"}])
    raw = sft_raw(tiny_model_dir, tmp_path, [f"data={{source: {tmp_path / 'chat.jsonl'}}}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.data\.columns\.messages: '.*/chat\.jsonl' line 1: column 'messages' must be a list of chat "
           r"messages \(\{role, content\} objects\), got str 'hello'")


def test_demonstration_stage_without_completions(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, ["data.columns={prompt: question, answer: answer}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.data\.columns: '.*/data\.jsonl' line 1 has no completion; a demonstration objective needs the "
           r"role 'completion'")


def test_every_demonstration_longer_than_max_length(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, ["data.max_length=4"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.data\.max_length: every example of '.*/data\.jsonl' is longer than max_length=4 tokens")


def test_every_prompt_longer_than_max_length(tiny_model_dir, tmp_path, capsys, no_training):
    raw = rl_raw(tiny_model_dir, tmp_path, ["data.max_length=4"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.data\.max_length: every prompt of '.*/data\.jsonl' is longer than max_length=4 tokens")


def test_gsm8k_row_without_the_answer_marker(tiny_model_dir, tmp_path, capsys, no_training):
    rows = [{"question": "q1", "answer": "2 + 2 = 4\n#### 4"}, {"question": "q2", "answer": "He has 3 + 4 = 7 apples."},
            {"question": "q3", "answer": "#### 5"}]
    _jsonl(tmp_path / "gsm.jsonl", rows)
    raw = rl_raw(tiny_model_dir, tmp_path, [f"data={{source: {tmp_path / 'gsm.jsonl'}, max_length: 48, "
                                            "columns: {prompt: question, answer: answer}}",
                                            "rewards=[{name: gsm8k}]"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.rewards\.0: reward 'gsm8k' cannot score this data: '.*/gsm\.jsonl' line 2: the gold answer in "
           r"column 'answer' has no `####` \(the column's other rows mark their final answer with it\)")


def test_eval_data_missing(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path, [f"eval={{data: {{source: {tmp_path / 'held-out.jsonl'}}}}}"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.eval\.data\.source: data file '.*/held-out\.jsonl' not found")


def test_eval_reward_unknown(tiny_model_dir, tmp_path, capsys, no_training):
    held_out = f"{{source: {tmp_path / 'data.jsonl'}, columns: {{prompt: question}}}}"
    raw = sft_raw(tiny_model_dir, tmp_path, [f"eval={{data: {held_out}, reward: exakt}}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"stages\.0\.eval\.reward: unknown reward 'exakt'; registered: ")


# ---------------------------------------------------------------------------------------------------- rewards
REWARD_FILES = {
    "a syntax error": ("def score(prompts, completions, **kw)\n    return [1.0] * len(completions)\n",
                       r"rewards\.0\.name: reward '.*/r\.py:score': .*/r\.py line 1: expected ':'"),
    "not callable": ("score = 3\n", r"rewards\.0\.name: reward '.*/r\.py:score': 'score' in '.*/r\.py' is a int, "
                                    r"not a function"),
    "no such function": ("def other(prompts, completions, **kw):\n    return []\n",
                         r"rewards\.0\.name: reward '.*/r\.py:score': '.*/r\.py' has no function 'score'; its "
                         r"functions: other"),
    "an import that fails": ("import no_such_module_here\n",
                             r"rewards\.0\.name: reward '.*/r\.py:score': importing .*/r\.py raised "
                             r"ModuleNotFoundError: No module named 'no_such_module_here' \(line 1\)"),
    "a required argument that is no column": (
        "def score(prompts, completions, solution_text, **kw):\n    return [1.0] * len(completions)\n",
        r"stages\.0\.rewards\.0: reward '.*/r\.py:score' requires the argument 'solution_text', which is neither a "
        r"column of the data \(its columns: answer, question, solution\) nor a setting in kwargs"),
    "an unknown setting": ("def score(prompts, completions, *, scale=1.0, **kw):\n"
                           "    return [1.0] * len(completions)\n",
                           r"rewards\.0\.kwargs\.scal: not a setting of reward '.*/r\.py:score'; its settings: scale"),
}


@pytest.mark.parametrize("case", list(REWARD_FILES))
def test_reward_file_with(tiny_model_dir, tmp_path, capsys, no_training, case):
    code, pattern = REWARD_FILES[case]
    (tmp_path / "r.py").write_text(code)
    spec = {"name": f"{tmp_path / 'r.py'}:score", **({"kwargs": {"scal": 2}} if case == "an unknown setting" else {})}
    raw = rl_raw(tiny_model_dir, tmp_path, [f"rewards=[{json.dumps(spec)}]"])
    expect(run_train(tmp_path, raw, capsys=capsys), pattern)


def test_reward_file_missing(tiny_model_dir, tmp_path, capsys, no_training):
    raw = rl_raw(tiny_model_dir, tmp_path, [f"rewards=[{{name: '{tmp_path / 'gone.py'}:score'}}]"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"rewards\.0\.name: reward '.*/gone\.py:score': file '.*/gone\.py' "
                                                    r"not found")


# ------------------------------------------------------------------------------------------- names and sizes
@pytest.mark.parametrize("override,pattern", [
    ("objectives={sft: {type: sftt}}", r"objectives\.sft\.type: unknown objective 'sftt'; registered: .*sft"),
    ("objectives.sft.aggregation=token_sum", r"objectives\.sft\.aggregation: got 'token_sum'; allowed: .*token_mean"),
    ("rollout.engine=vllm2", r"rollout\.engine: unknown rollout engine 'vllm2'; registered: hf, vllm, vllm-server"),
    ("rollout.mini_batch_size=3", r"rollout\.mini_batch_size: must divide the rollout batch \(prompts_per_step \* "
                                  r"sampling\.n = 4\), got 3"),
])
def test_unknown_name_or_size(tiny_model_dir, tmp_path, capsys, no_training, override, pattern):
    raw = rl_raw(tiny_model_dir, tmp_path, [override]) if "rollout" in override else sft_raw(
        tiny_model_dir, tmp_path, [override])
    expect(run_train(tmp_path, raw, capsys=capsys), pattern)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_engine_without_vllm(tiny_model_dir, tmp_path, capsys, no_training):
    raw = rl_raw(tiny_model_dir, tmp_path, ["rollout.engine=vllm"])
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"stages\.0\.rollout\.engine: the `vllm` rollout engine needs vLLM, which is not installed in this "
           r"environment\. Install vLLM: on GPUs `pip install vllm`")


def _two_process_preflight(tmp_path: Path, raw: dict) -> subprocess.CompletedProcess:
    """`posttrain train` as rank 0 of a 2-process launch (the preflight runs before any process group forms)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "posttrain", "train", str(recipe)], env=env, capture_output=True,
                          text=True, timeout=300, cwd=REPO)


@pytest.mark.parametrize("rl,override,pattern", [
    (False, "train.batch_size=7", r"stages\.0\.train\.batch_size \(7\) must be a multiple of the number of processes "
                                  r"\(2\)"),
    (True, "rollout.prompts_per_step=3", r"stages\.0\.rollout\.prompts_per_step \(3\) must be a multiple of the number "
                                         r"of processes \(2\)"),
    (True, "rollout.mini_batch_size=1", r"stages\.0\.rollout\.mini_batch_size \(1\) must be a multiple of the number "
                                        r"of processes \(2\)"),
])
def test_batch_that_does_not_split_over_the_processes(tiny_model_dir, tmp_path, rl, override, pattern):
    raw = (rl_raw if rl else sft_raw)(tiny_model_dir, tmp_path, [override])
    proc = _two_process_preflight(tmp_path, raw)
    assert proc.returncode == 2, proc.stderr[-2000:]
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("posttrain: error: ")]
    assert line.startswith(f"posttrain: error: {tmp_path / 'recipe.yaml'}: "), line
    expect(line, pattern)
    assert "Traceback" not in proc.stderr and not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ output and resume
def test_output_dir_that_is_a_file(tiny_model_dir, tmp_path, capsys, no_training):
    (tmp_path / "taken").write_text("a file")
    raw = sft_raw(tiny_model_dir, tmp_path, [f"output_dir={tmp_path / 'taken'}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"output_dir: '.*/taken' is a file; expected a directory")
    assert (tmp_path / "taken").read_text() == "a file"


def test_output_dir_inside_a_file(tiny_model_dir, tmp_path, capsys, no_training):
    (tmp_path / "taken").write_text("a file")
    raw = sft_raw(tiny_model_dir, tmp_path, [f"output_dir={tmp_path / 'taken/run'}"])
    expect(run_train(tmp_path, raw, capsys=capsys), r"output_dir: '.*/taken' is a file; expected a directory")


def _fake_run(tmp_path: Path, raw: dict) -> Path:
    """A run directory as a run of `raw` leaves it: recipe.yaml, metrics.jsonl, one complete checkpoint."""
    run = Path(raw["output_dir"])
    record_recipe(parse_recipe(raw, str(tmp_path / "recipe.yaml")))
    (run / "metrics.jsonl").write_text('{"step": 0, "stage": 0, "world_size": 1}\n')
    step = run / "checkpoints/step-000002"
    step.mkdir(parents=True)
    (step / ckpt.STATE_FILE).write_text(json.dumps({"stage": 0, "step": 2, "global_step": 2}))
    (step / "model.safetensors").write_bytes(b"weights")
    ckpt._write_manifest(step)
    return run


def _listing(run: Path) -> dict:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_output_dir_already_holding_a_run(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path)
    run = _fake_run(tmp_path, raw)
    before = _listing(run)
    expect(run_train(tmp_path, raw, capsys=capsys),
           r"output_dir: '.*/run' already holds a run \(step-000002, metrics\.jsonl\); continue it with --resume auto, "
           r"or give another output_dir")
    assert _listing(run) == before


def test_resume_with_a_different_recipe(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path)
    run = _fake_run(tmp_path, raw)
    before = _listing(run)
    changed = sft_raw(tiny_model_dir, tmp_path, ["optim.lr=0.01", "stages.0.train.steps=9", "train.log_every=5"])
    expect(run_train(tmp_path, changed, "--resume", "auto", capsys=capsys),
           r"--resume .*/run/checkpoints/step-000002: the run was started with a different recipe "
           r"\(.*/run/recipe\.yaml\): stages\.0\.optim\.lr: 0\.001 in the run, 0\.01 now; stages\.0\.train\.steps: 4 "
           r"in the run, 9 now\. Resume with the recipe it was started with")             # log_every may differ
    assert _listing(run) == before


def test_resume_from_a_directory_that_does_not_exist(tiny_model_dir, tmp_path, capsys, no_training):
    raw = sft_raw(tiny_model_dir, tmp_path)
    expect(run_train(tmp_path, raw, "--resume", str(tmp_path / "nowhere"), capsys=capsys, named=False),
           r"^--resume .*/nowhere: no such checkpoint directory")


def test_resume_auto_without_a_checkpoint_starts_from_the_beginning(tiny_model_dir, tmp_path, capsys):
    """A job script passes `--resume auto` on every launch: before the first checkpoint (a kill during set-up or
    step 1) it starts over, dropping the rows the killed attempt logged."""
    raw = sft_raw(tiny_model_dir, tmp_path, ["stages.0.train.steps=2"])
    (tmp_path / "run").mkdir()
    (tmp_path / "run/metrics.jsonl").write_text('{"step": 0, "stage": 0, "world_size": 1}\n{"step": 1, "loss": 9.0')
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(raw))
    assert main(["train", str(recipe), "--resume", "auto"]) == 0
    assert re.search(r"--resume auto: no checkpoint under .*/run/checkpoints yet; starting from the beginning",
                     capsys.readouterr().err)
    assert [(r["step"], "loss" in r) for r in read_metrics(tmp_path / "run")] == [(0, False), (1, True), (2, True)]


# ------------------------------------------------------------------------------------- recipe and launcher
def test_recipe_file_missing(tmp_path, capsys, no_training):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert capsys.readouterr().err == f"posttrain: error: {tmp_path / 'nope.yaml'}: recipe file not found\n"


def test_launch_config_that_does_not_exist(tiny_model_dir, tmp_path):
    """posttrain has no launcher of its own: `accelerate launch` refuses a missing --config_file before posttrain
    starts (README: check one with `accelerate env --config_file FILE`)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(sft_raw(tiny_model_dir, tmp_path)))
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or "accelerate"
    proc = subprocess.run([accelerate, "launch", "--config_file", str(tmp_path / "missing.yaml"), "-m", "posttrain",
                           "train", str(recipe)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"The passed configuration file `{tmp_path / 'missing.yaml'}` does not exist" in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
