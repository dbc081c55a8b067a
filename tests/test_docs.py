"""README and recipes stay true to the code, by running them: the recipe-anatomy example trains a step of each stage,
every command of the README's table answers --help, CI extracts and runs README's test command, and every recipe
parses and resolves what it names (model, data and its columns, rewards, the eval verifier)."""
import re
import subprocess
from importlib.metadata import requires

import pytest
import yaml

from posttrain.cli import build_parser, main
from posttrain.config import load_recipe, parse_recipe
from posttrain.configlib import apply_overrides

from conftest import REPO, SHARED_GSM8K, read_metrics

README = (REPO / "README.md").read_text()
RECIPES = sorted(p.relative_to(REPO) for p in (REPO / "recipes").rglob("*.yaml"))


def _block(heading: str, lang: str) -> str:
    block = re.search(rf"^## {heading}\n.*?^```{lang}\n(.*?)^```", README, re.S | re.M)
    assert block, f"README has no ```{lang} block under '## {heading}'"
    return block.group(1)


def _table_commands() -> list[list[str]]:
    """The subcommand words of each row of README's command table (`posttrain config show RECIPE` -> [config, show])."""
    table = README.split("## Commands", 1)[1].split("\n\n", 2)[1]
    rows = re.findall(r"^\| `posttrain ([^`]+)`", table, re.M)
    assert rows, "README's command table has no `posttrain ...` rows"
    return [list(dict.fromkeys(w for w in row.split() if re.fullmatch(r"[a-z][a-z-]*", w))) for row in rows]


def test_quickstart_installs_the_pinned_set():
    """Both commands install with `-c .ci/constraints.txt`, which pins every dependency pyproject names (the test
    extra included) inside pyproject's range, and leaves torch (pinned on the command line) and posttrain out."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    assert all("-c .ci/constraints.txt" in line for line in _block("Quickstart", "bash").splitlines() if line.strip())
    pins = {}
    for line in (REPO / ".ci/constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    assert "torch" not in pins and "posttrain" not in pins
    for line in requires("posttrain"):                   # pyproject's dependencies and extras, as installed
        req = Requirement(line)
        name = canonicalize_name(req.name)
        if name != "torch" and (req.marker is None or req.marker.evaluate({"extra": "test"})):
            assert name in pins, f"{name} is not pinned in .ci/constraints.txt"
            assert req.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside pyproject's {req.specifier}"


@pytest.mark.slow
def test_readme_recipe_anatomy_trains_a_step_of_each_stage(tiny_model_dir, tmp_path):
    from posttrain.trainer import train

    raw = apply_overrides(yaml.safe_load(_block("Recipe anatomy", "yaml")), [
        f"model.path={tiny_model_dir}", f"output_dir={tmp_path / 'run'}", "logging.report_to=[]",
        "logging.progress_bar=false", "stages.0.train.steps=1", "stages.1.train.steps=1", "train.log_every=1",
        "eval.num_samples=4", "rollout.prompts_per_step=2", "rollout.sampling.n=2"], "README.md")
    recipe = parse_recipe(raw, "README.md")
    assert [(s.name, list(s.objectives)) for s in recipe.stages] == [("sft", ["sft"]), ("grpo", ["grpo"])]
    result = train(recipe)
    rows = [r for r in read_metrics(tmp_path / "run") if "loss" in r]
    assert [(r["stage"], r["step"]) for r in rows] == [(0, 1), (1, 2)]
    assert "reward/mean" in rows[1] and result["eval/num_samples"] == 4


@pytest.mark.parametrize("words", _table_commands(), ids=" ".join)
def test_every_readme_command_answers_help(words, capsys):
    with pytest.raises(SystemExit) as e:
        main([*words, "--help"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"usage: posttrain {' '.join(words)}")


def test_readme_table_lists_every_command():
    parser = build_parser()
    top = next(a for a in parser._actions if a.dest == "==SUPPRESS==" and getattr(a, "choices", None))
    listed = {words[0] for words in _table_commands()}
    assert listed == set(top.choices), f"README's table lists {sorted(listed)}; the CLI has {sorted(top.choices)}"


def test_ci_runs_readme_test_command():
    """.ci/run's own extraction of README's test command, run as CI runs it, yields the Quickstart's second line."""
    ci = (REPO / ".ci/run").read_text()
    extraction = re.search(r"^test_command=\$\((.*)\)$", ci, re.M)
    assert extraction, ".ci/run no longer sets test_command=$(...)"
    got = subprocess.run(["bash", "-c", extraction.group(1)], cwd=REPO, capture_output=True, text=True, check=True)
    first, second = [line for line in _block("Quickstart", "bash").splitlines() if line.strip()]
    assert got.stdout.strip() == second
    assert "-e '.[test]'" in second and "-m pytest" in second and "torch==2.13.0" in second
    assert "posttrain train recipes/quickstart.yaml" in first                  # resolved by the recipe test below


def _resolve_model(path: str, where: str) -> None:
    if path == "tiny":
        return
    if (REPO / path).exists():
        return
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(path)                             # a hub name that could be fetched (no hub here)


def _resolve_data(cfg, where: str) -> None:
    """The data a recipe names exists and has the columns it maps: a task, a local file, or a hub data set (read from
    the local copy of GSM8K beside the checkout, the recipes' documented offline source)."""
    import dataclasses

    from posttrain.data import load_rows, to_examples

    if cfg.source.startswith("task:") or (REPO / cfg.source).exists():
        local = dataclasses.replace(cfg, limit=8)
    elif cfg.source == "openai/gsm8k":
        split = {"train": "train", "test": "test"}[cfg.split]
        if not (SHARED_GSM8K / f"{split}.jsonl").is_file():
            pytest.skip(f"GSM8K files not found at {SHARED_GSM8K}")
        local = dataclasses.replace(cfg, source=str(SHARED_GSM8K / f"{split}.jsonl"), limit=8)
    else:
        raise AssertionError(f"{where}.source: {cfg.source!r} is neither a task, a file nor a known hub data set")
    rows, columns = load_rows(local, where)
    assert to_examples(rows, columns, local, where)


@pytest.mark.parametrize("path", RECIPES, ids=str)
def test_every_recipe_parses_and_resolves(path):
    from posttrain.rewarding import RewardSpec, load_rewards
    from posttrain.rewarding.loading import load_reward

    recipe = load_recipe(REPO / path)
    assert recipe.stages
    _resolve_model(recipe.model.path, "model.path")
    for i, stage in enumerate(recipe.stages):
        _resolve_data(stage.data, f"stages.{i}.data")
        if stage.eval.data is not None:
            _resolve_data(stage.eval.data, f"stages.{i}.eval.data")
            load_reward(RewardSpec(name=stage.eval.reward), f"stages.{i}.eval.reward", str(path)).close()
        for r in load_rewards(stage.rewards, f"stages.{i}.rewards", str(path)):
            r.close()
